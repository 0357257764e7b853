"""The ``lora-jax`` command."""

from __future__ import annotations

import argparse
import sys

from . import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lora-jax",
        description="Low-rank adaptation (LoRA) for JAX/Flax models.",
    )
    parser.add_argument("--version", action="version", version=f"lora-jax {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("info", help="print the library version and the JAX devices it sees")
    merge = sub.add_parser(
        "merge",
        help="merge an adapter checkpoint into a base checkpoint, writing a plain orbax checkpoint",
        description="Fold the adapter at ADAPTER (lj.checkpoint.save or a training step "
        "directory) into the plain orbax parameter checkpoint at BASE and write the merged "
        "parameters to the new directory OUT, loadable with plain orbax.",
    )
    merge.add_argument("base", metavar="BASE", help="orbax checkpoint of the base parameters")
    merge.add_argument("adapter", metavar="ADAPTER", help="adapter checkpoint directory")
    merge.add_argument("out", metavar="OUT", help="output directory (must not exist)")
    return parser


def main(argv=None) -> int:
    """Entry point of the ``lora-jax`` console script.

    Commands: ``info``; ``merge BASE ADAPTER OUT`` (see :func:`lora_jax.checkpoint.merge`).
    Problems with the checkpoints (missing, incomplete, shapes that do not fit) are
    printed to stderr as one ``error:`` line, with exit status 1.

    >>> main(["--help"])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    SystemExit: 0
    >>> main(["merge", "/no/base", "/no/adapter", "/no/out"])
    1
    """
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.command is None:
        parser.print_help()
        return 0
    if ns.command == "info":
        import jax

        print(f"lora-jax {__version__}, jax {jax.__version__}, devices: {jax.devices()}")
        return 0
    if ns.command == "merge":
        from . import checkpoint

        try:
            paths = checkpoint.merge(ns.base, ns.adapter, ns.out)
        except (FileNotFoundError, FileExistsError, ValueError, TypeError) as e:
            print(f"lora-jax merge: error: {e}", file=sys.stderr)
            return 1
        print(f"merged {len(paths)} adapter(s) into {ns.out}")
        return 0
    parser.error(f"unknown command {ns.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
