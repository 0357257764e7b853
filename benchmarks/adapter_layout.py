"""Which storage layout of the adapter factors trains fastest on this backend?

One layer y = x·W + s·(x·A)·B, forward plus gradients w.r.t. x, A and B, for the three
layouts of (A, B): (in, r)/(r, out), rank-major (r, in)/(r, out) (lora_jax's choice) and
PEFT's storage (r, in)/(out, r); each as a ratio to the frozen layer (forward + gradient
w.r.t. x only). Medians of several timed runs, all measured side by side in one process.

Run: python benchmarks/adapter_layout.py [--tokens 1024 --d-in 512 --d-out 2048 --rank 8]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp


def bench(fn, *args, reps=30, inner=5):
    out = fn(*args)
    jax.block_until_ready(out)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times)


def main(tokens=1024, d_in=512, d_out=2048, rank=8, dtype="float32", reps=30):
    dt = jnp.dtype(dtype)
    k = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(k[0], (tokens, d_in), dt)
    w = jax.random.normal(k[1], (d_in, d_out), dt) / d_in**0.5
    g = jax.random.normal(k[2], (tokens, d_out), dt)
    s = 2.0

    # every array is an argument: closed-over constants would be constant-folded by XLA
    def frozen(x, w, g):
        y, vjp = jax.vjp(lambda x: x @ w, x)
        return y, vjp(g)

    layouts = {
        "A (in, r), B (r, out)": ("ir,ro", (d_in, rank), (rank, d_out)),
        "A (r, in), B (r, out)  [lora_jax]": ("ri,ro", (rank, d_in), (rank, d_out)),
        "A (r, in), B (out, r)  [PEFT]": ("ri,or", (rank, d_in), (d_out, rank)),
    }
    fns = {"frozen (grad x only)": (jax.jit(frozen), (x, w, g))}
    for name, (spec, a_shape, b_shape) in layouts.items():
        sa, sb = spec.split(",")
        a = jax.random.normal(k[3], a_shape, dt) * 0.01
        b = jnp.zeros(b_shape, dt)

        def lora(x, a, b, w, g, sa=sa, sb=sb):
            def f(x, a, b):
                h = jnp.einsum(f"ti,{sa}->tr", x, a)
                return x @ w + s * jnp.einsum(f"tr,{sb}->to", h, b)

            y, vjp = jax.vjp(f, x, a, b)
            return y, vjp(g)

        fns[name] = (jax.jit(lora), (x, a, b, w, g))

    times = {name: bench(fn, *args, reps=reps) for name, (fn, args) in fns.items()}
    ref = times["frozen (grad x only)"]
    print(f"backend={jax.default_backend()} device={jax.devices()[0].device_kind} "
          f"x=({tokens}, {d_in}) W=({d_in}, {d_out}) r={rank} {dtype}")
    for name, t in times.items():
        print(f"  {name:38s} {t * 1e3:8.3f} ms   {t / ref:5.2f}x frozen")
    return times


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--d-in", type=int, default=512)
    p.add_argument("--d-out", type=int, default=2048)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--reps", type=int, default=30)
    a = p.parse_args()
    main(a.tokens, a.d_in, a.d_out, a.rank, a.dtype, a.reps)
