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
    return parser


def main(argv=None) -> int:
    """Entry point of the ``lora-jax`` console script.

    >>> main(["--help"])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    SystemExit: 0
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
    parser.error(f"unknown command {ns.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
