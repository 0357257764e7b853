"""Subprocess for the crash-safety tests: saves checkpoints and gets killed part-way.

Usage: python checkpoint_worker.py DIR MODE

Every adapter it writes is ``adapter(seed)``, so the parent can rebuild the expected
arrays. It prints ``saved`` once ``DIR/first`` (seed 0) is complete, then:

  stall:    saves seed 1 to ``DIR/second``, but blocks (printing ``committing``) when orbax
            renames the finished temporary directory into place: the parent kills it there.
  manager:  a Manager in ``DIR/run`` saves step 1 (prints ``step1``), then stalls the same
            way while saving step 2.
  loop:     saves seeds 1, 2, ... to ``DIR/loop-<seed>`` until the parent kills it at an
            arbitrary moment.
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import lora_jax as lj  # noqa: E402
from lora_jax import checkpoint  # noqa: E402

SHAPES = {"params": {"q": (256, 512), "v": (512, 256), "o": (256, 256)}}
RANK = 16
TMP_MARK = ".orbax-checkpoint-tmp"


def adapter(seed: int, scale_dim: int = 1):
    """A lora tree with three targets and seeded gaussian factors (about 100 KiB * scale_dim)."""
    params = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct((s[0] * scale_dim, s[1]), jnp.float32),
        SHAPES,
        is_leaf=lambda x: isinstance(x, tuple),
    )
    cfg = lj.LoraConfig(rules=(lj.Rule("params/.*", rank=RANK, alpha=32.0),))
    _, abstract = lj.split(jax.random.key(0), params, cfg)
    rng = np.random.default_rng(seed)

    def fill(w):
        a = rng.standard_normal(w.a.shape).astype(np.float32)
        b = rng.standard_normal(w.b.shape).astype(np.float32)
        return w.replace(a=jnp.asarray(a), b=jnp.asarray(b))

    return jax.tree.map(fill, abstract, is_leaf=lj.is_lora)


def stall_at_commit():
    """Block forever when orbax renames a finished temporary checkpoint into place."""
    from etils.epath import gpath

    rename = gpath._GPath.rename

    def blocking_rename(self, target):
        if TMP_MARK in self.name:
            print("committing", flush=True)
            time.sleep(3600)
        return rename(self, target)

    gpath._GPath.rename = blocking_rename


def main(directory: str, mode: str) -> None:
    checkpoint.save(os.path.join(directory, "first"), adapter(0))
    print("saved", flush=True)
    if mode == "stall":
        stall_at_commit()
        checkpoint.save(os.path.join(directory, "second"), adapter(1))
    elif mode == "manager":
        with checkpoint.Manager(os.path.join(directory, "run")) as mgr:
            mgr.save(1, adapter(1))
            print("step1", flush=True)
            stall_at_commit()
            mgr.save(2, adapter(2))
    elif mode == "loop":
        for seed in range(1, 10_000):
            checkpoint.save(os.path.join(directory, f"loop-{seed}"), adapter(seed, scale_dim=8))
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    print("finished", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
