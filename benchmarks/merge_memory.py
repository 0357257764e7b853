"""Peak host memory and time of ``lora-jax merge``: streamed against the whole-tree merge.

Writes a float32 base of ``--weights`` equal weights (``--gib`` GiB in all; the default
4 GiB is 32 weights of 128 MiB) and a rank-8 adapter on every weight, then merges it
``--repeats`` times each way, interleaved: ``lora-jax merge BASE ADAPTER OUT`` (streamed)
and ``lj.checkpoint.merge(..., stream=False)`` (the base restored, merged and saved at
once), each in a fresh subprocess whose peak resident memory (``ru_maxrss``) is read
when it exits. Prints each run, then the medians: peak RSS as a ratio to the base's
bytes (and the same above a subprocess that only imports the library), and the
streamed time as a ratio to the whole-tree time.

Run: python benchmarks/merge_memory.py [--gib 4] [--weights 32] [--repeats 2] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

WHOLE = ("import sys; from lora_jax import checkpoint; "
         "checkpoint.merge(sys.argv[1], sys.argv[2], sys.argv[3], stream=False)")
IMPORTS = "import jax, orbax.checkpoint, lora_jax; from lora_jax.app import cli; jax.numpy.ones(1).block_until_ready()"


def write_inputs(root: str, gib: float, weights: int) -> tuple[str, str, int]:
    """A base of ``weights`` float32 (rows, rows) weights, ``gib`` GiB in all, and an adapter."""
    import jax
    import jax.numpy as jnp

    import lora_jax as lj
    from lora_jax import checkpoint

    rows = int(np.sqrt(gib * 2**30 / weights / 4))
    rng = np.random.default_rng(0)
    params = {f"layer_{i:02d}": {"kernel": rng.standard_normal((rows, rows), np.float32),
                                  "bias": np.zeros(rows, np.float32)} for i in range(weights)}
    base = os.path.join(root, "base")
    checkpoint.save_params(base, params)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    config = lj.LoraConfig(rules=(lj.Rule(r".*/kernel", rank=8, alpha=16.0),))
    _, lora = lj.split(jax.random.key(0), abstract, config)  # abstract: no base copy
    lora = jax.tree.map(lambda w: w if w is None else w.replace(
        a=jnp.full(w.a.shape, 0.01, w.a.dtype), b=jnp.full(w.b.shape, 0.02, w.b.dtype)),
        lora, is_leaf=lambda x: x is None or isinstance(x, lj.LoraWeight))
    adapter = os.path.join(root, "adapter")
    checkpoint.save(adapter, lora, config)
    return base, adapter, sum(x.nbytes for x in jax.tree.leaves(params))


# runs the command given to it and prints its peak RSS in kilobytes; a small process, so the
# command's peak is its own (Linux counts the pre-exec image of the forking process in it)
PEAK = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def measured(cmd: list[str]) -> tuple[float, int]:
    """Seconds and peak resident bytes of the subprocess ``cmd`` (it must succeed)."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PEAK, *cmd], capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return seconds, int(proc.stdout.split()[-1]) * 1024  # (kilobytes on Linux)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=4.0, help="base size in GiB (default 4)")
    parser.add_argument("--weights", type=int, default=32, help="number of equal weights (default 32)")
    parser.add_argument("--repeats", type=int, default=2, help="merges of each kind, interleaved")
    parser.add_argument("--dir", default=None, help="scratch directory (default: a new temporary one)")
    args = parser.parse_args(argv)
    root = tempfile.mkdtemp(dir=args.dir)
    cli = os.path.join(os.path.dirname(sys.executable), "lora-jax")
    streamed_cmd = [cli] if os.path.exists(cli) else [sys.executable, "-m", "lora_jax.app.cli"]
    try:
        # written by a subprocess: this one stays small, and so do the ones it starts
        made = subprocess.run([sys.executable, os.path.abspath(__file__), "--write", root, str(args.gib),
                               str(args.weights)], check=True, capture_output=True, text=True)
        base, adapter, nbytes = made.stdout.split()[-3:]
        nbytes = int(nbytes)
        print(f"base: {nbytes / 2**30:.2f} GiB in {args.weights} weights of {nbytes / args.weights / 2**20:.0f} MiB")
        _, floor = measured([sys.executable, "-c", IMPORTS])
        print(f"a subprocess that only imports the library: peak RSS {floor / 2**20:.0f} MiB")
        runs = {"whole": [], "streamed": []}
        for r in range(args.repeats):
            order = ("whole", "streamed") if r % 2 == 0 else ("streamed", "whole")
            for kind in order:
                out = os.path.join(root, f"out_{kind}_{r}")
                cmd = ([sys.executable, "-c", WHOLE] if kind == "whole" else streamed_cmd + ["merge"]) + [base, adapter, out]
                seconds, peak = measured(cmd)
                runs[kind].append((seconds, peak))
                print(f"  {kind:8s} run {r}: {seconds:6.2f} s, peak RSS {peak / 2**20:7.0f} MiB "
                      f"= {peak / nbytes:.3f}x the base")
                shutil.rmtree(out)
        med = {k: (statistics.median(s for s, _ in v), statistics.median(p for _, p in v)) for k, v in runs.items()}
        for kind, (seconds, peak) in med.items():
            print(f"{kind:8s}: peak RSS {peak / nbytes:.3f}x the base ({(peak - floor) / nbytes:.3f}x above "
                  f"the imports), {seconds:.2f} s")
        print(f"peak RSS ratio streamed/base: {med['streamed'][1] / nbytes:.3f} "
              f"(whole-tree: {med['whole'][1] / nbytes:.3f})")
        print(f"time ratio streamed/whole-tree: {med['streamed'][0] / med['whole'][0]:.3f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--write"]:
        print(*write_inputs(sys.argv[2], float(sys.argv[3]), int(sys.argv[4])))
    else:
        main()
