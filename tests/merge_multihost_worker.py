"""One of 2 processes (4 CPU devices each, jax.distributed on 127.0.0.1) that save a sharded
base and an adapter, merge them with ``shardings=`` (each process reading and writing its own
shards of the weight) and check the merged weight against ``lj.merge`` of the host arrays.

Run by tests/test_merge_stream.py: ``python merge_multihost_worker.py PROCESS_ID PORT DIR``.
"""

import os
import sys


def main(pid: int, port: str, root: str) -> None:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    import numpy as np, jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P
    from jax.experimental import multihost_utils
    import lora_jax as lj
    from lora_jax import checkpoint
    mesh = jax.make_mesh((8,), ("x",))
    sh = NamedSharding(mesh, P("x")); rep = NamedSharding(mesh, P())
    host = {"w": np.arange(16 * 8, dtype=np.float32).reshape(16, 8), "b": np.ones(8, np.float32)}
    params = {k: jax.make_array_from_callback(v.shape, sh if k == "w" else rep, lambda idx, v=v: v[idx]) for k, v in host.items()}
    cfg = lj.LoraConfig(rules=(lj.Rule("w", rank=2),))
    _, lora = lj.split(jax.random.key(0), jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), host), cfg)
    g = lambda shape, v: jax.make_array_from_callback(shape, rep, lambda idx: np.full(shape, v, np.float32)[idx])
    lora = {"w": lora["w"].replace(a=g(lora["w"].a.shape, 0.5), b=g(lora["w"].b.shape, 0.25)), "b": None}
    host_lora = {"w": lora["w"].replace(a=np.full(lora["w"].a.shape, 0.5, np.float32), b=np.full(lora["w"].b.shape, 0.25, np.float32)), "b": None}
    checkpoint.save_params(os.path.join(root, "base"), params)
    checkpoint.save(os.path.join(root, "adapter"), lora, cfg)
    checkpoint.merge(os.path.join(root, "base"), os.path.join(root, "adapter"), os.path.join(root, "out"),
                     shardings={"w": sh, "b": rep})
    got = checkpoint.restore_params(os.path.join(root, "out"), like={"w": jax.ShapeDtypeStruct((16, 8), jnp.float32, sharding=sh), "b": jax.ShapeDtypeStruct((8,), jnp.float32, sharding=rep)})
    want = lj.merge(host, host_lora)
    g = multihost_utils.process_allgather(got["w"], tiled=True)
    assert np.array_equal(np.asarray(g), np.asarray(want["w"])), (g, want["w"])
    assert sorted(os.listdir(root)) == ["adapter", "base", "out"], os.listdir(root)  # no staging left
    print(pid, "merged", sorted(n for n in os.listdir(os.path.join(root, "out")) if n.startswith("ocdbt.process_")))
    jax.distributed.shutdown()


if __name__ == "__main__":  # (collecting this file as a module runs nothing)
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3])
