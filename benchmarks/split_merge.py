"""Cost of split and merge: abstract split of GPT-3 175B, merge vs a plain pass over the base.

Prints: seconds to split a 175B-parameter abstract tree (q, v at r=8); for a concrete
~50M-parameter stack, the jitted merge's time as a ratio to a jitted elementwise pass over
the same base (the memory-bandwidth floor), and the compiled merge's temporary memory with
and without donating the base (memory_analysis), as a ratio to the base's bytes.

Run: python benchmarks/split_merge.py
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import lora_jax as lj


def gpt3_175b():
    d, layers = 12288, 96
    sds = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16)
    layer = {
        "attn": {n: {"kernel": sds(d, d)} for n in ("q", "k", "v", "o")},
        "mlp": {"up": {"kernel": sds(d, 4 * d)}, "down": {"kernel": sds(4 * d, d)}},
    }
    return {"embed": {"embedding": sds(50257, d)}, **{f"layer_{i}": layer for i in range(layers)}}


def timed(fn, *args, reps=10):
    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main(layers=6, d=1024):
    cfg8 = lj.LoraConfig(rules=(lj.Rule(r".*/attn/(q|v)/kernel", rank=8, alpha=16.0),))
    t0 = time.perf_counter()
    _, lora = lj.split(jax.random.key(0), gpt3_175b(), cfg8)
    t_split = time.perf_counter() - t0
    n = sum(w.num_params for _, w in lj.targets(lora))
    print(f"abstract split of GPT-3 175B (q,v r=8): {t_split:.2f} s, {n:,} trainable params")

    key = jax.random.key(1)
    params = {
        f"layer_{i}": {
            "attn": {m: {"kernel": jax.random.normal(jax.random.fold_in(key, 10 * i + j), (d, d))}
                     for j, m in enumerate("qkvo")},
            "mlp": {"up": {"kernel": jnp.zeros((d, 4 * d))}, "down": {"kernel": jnp.zeros((4 * d, d))}},
        }
        for i in range(layers)
    }
    cfg = lj.LoraConfig(rules=(lj.Rule(r".*/kernel", rank=8, alpha=16.0),))
    base, lora = lj.split(jax.random.key(2), params, cfg)
    base_bytes = sum(x.nbytes for x in jax.tree.leaves(base))
    floor = jax.jit(lambda b: jax.tree.map(lambda x: x * 1.0001, b))
    merge = jax.jit(lj.merge)
    t_floor, t_merge = timed(floor, base), timed(merge, base, lora)
    print(f"merge of {base_bytes / 2**20:.0f} MiB ({layers} layers, d={d}, r=8 on all kernels): "
          f"{t_merge * 1e3:.1f} ms = {t_merge / t_floor:.2f}x an elementwise pass ({t_floor * 1e3:.1f} ms)")
    for donate in (False, True):
        c = jax.jit(lj.merge, donate_argnums=(0,) if donate else ()).lower(base, lora).compile()
        m = c.memory_analysis()
        if m is None:
            print("memory_analysis unavailable on this backend")
            break
        print(f"  compiled merge, donate={donate}: temp {m.temp_size_in_bytes / base_bytes:.3f}x base, "
              f"output {m.output_size_in_bytes / base_bytes:.2f}x, alias {m.alias_size_in_bytes / base_bytes:.2f}x")
    return t_split


if __name__ == "__main__":
    main()
