"""One process of the multi-host test: ``python multihost_worker.py PROCESS_ID PORT OUT.npz``.

Starts ``jax.distributed`` on 127.0.0.1 with 2 processes of 4 CPU devices each and runs the
sharded example (``examples/sharded_train.py``) unchanged on the global 2 x 4 (data x
model) mesh; process 0 writes the losses, the merged model's loss and the trained adapter
(gathered from both processes) to ``OUT.npz``.
"""

import os
import sys

if __name__ == "__main__":
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0"
    os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402
import sharded_train  # noqa: E402

# The example's command line for both the 2-process run and the 1-process reference: a
# (data=2, model=4) mesh over 8 devices and a model small enough to compile quickly.
ARGV = ["--mesh", "2d", "--model-parallel", "4", "--steps", "3", "--vocab", "32", "--d-model", "16",
        "--heads", "4", "--head-dim", "4", "--mlp", "32", "--layers", "1", "--seq", "6", "--batch", "8"]


def results(out: dict) -> dict:
    """The numbers to compare: losses, merged loss, every adapter factor (host numpy)."""
    flat = {
        "lora/" + jax.tree_util.keystr(p, simple=True, separator="/"): np.asarray(x)
        for p, x in jax.tree_util.tree_flatten_with_path(out["lora"])[0]
    }
    return {"losses": np.asarray(out["losses"]), "merged_loss": np.asarray(out["merged_loss"]), **flat}


def main(process_id: int, port: int, path: str):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=2,
        process_id=process_id,
        initialization_timeout=120,
    )
    if (jax.process_count(), jax.device_count(), jax.local_device_count()) != (2, 8, 4):
        raise RuntimeError(f"expected 2 processes x 4 devices, got {jax.process_count()} x {jax.local_device_count()}")
    out = sharded_train.main(ARGV)["2d"]
    if process_id == 0:
        np.savez(path, **results(out))
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
