"""The ``lora-jax`` command: finetune, sweep, inspect, export-peft, merge, info."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys

from ..version import __version__

_DEFAULT_CONFIG = "configs/default.yaml"

# what an interrupted command leaves, said on its one line ({out}: where it writes)
_RESUME_HINT = {
    "finetune": "; the checkpoints of {out} are kept: run the same command with --resume to continue "
    "from the last one",
    "sweep": "; run it again (with --overwrite if {out} holds results) to start over",
}


def _add_run_args(p: argparse.ArgumentParser, config_required: bool):
    if config_required:
        p.add_argument("config", metavar="CONFIG", help="YAML config file (see configs/)")
    else:
        p.add_argument("config", metavar="CONFIG", nargs="?", default=None,
                       help=f"YAML config file (default: {_DEFAULT_CONFIG} when it exists, else the built-in defaults)")
    p.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[],
                   help="override one config key, value read as YAML (repeatable): --set lora.rank=16")
    p.add_argument("--overwrite", action="store_true", help="replace the results already in output.dir")


def build_parser() -> argparse.ArgumentParser:
    """The ``lora-jax`` argument parser: one subcommand each for the jobs and the checkpoint tools.

    >>> ns = build_parser().parse_args(["finetune", "--set", "lora.rank=16", "--resume"])
    >>> ns.command, ns.config, ns.overrides, ns.resume
    ('finetune', None, ['lora.rank=16'], True)
    """
    parser = argparse.ArgumentParser(
        prog="lora-jax",
        description="Low-rank adaptation (LoRA) for JAX/Flax models.",
    )
    parser.add_argument("--version", action="version", version=f"lora-jax {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("info", help="print the library version and the JAX devices it sees")
    _add_jobs(sub)
    _add_checkpoint_tools(sub)
    return parser


def _add_jobs(sub) -> None:
    """``finetune`` and ``sweep``: the training jobs, configured by a YAML file and ``--set``."""
    ft = sub.add_parser(
        "finetune",
        help="LoRA-adapt the embedded pretrained model (or your config's) to a new text domain",
        description="Pretrain the default byte-level model on Python's documentation (once, cached "
        "under the user cache directory), adapt it with LoRA (or AdaLoRA: --set lora.method=adalora) "
        "to the standard library's source code, "
        "and report target- and source-domain loss before and after. Writes adapter/, merged/, "
        "metrics.json, loss.png, config.yaml and checkpoints/ to output.dir.",
    )
    _add_run_args(ft, config_required=False)
    ft.add_argument("--compare-full", action="store_true", help="also run a full fine-tune baseline")
    ft.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output.dir")

    sw = sub.add_parser(
        "sweep",
        help="rank sweep (alpha = r, rsLoRA and DoRA), then alpha/r at the best rank; tables and plots",
        description="Writes results.csv, results.md, loss_vs_rank.png, delta_norms.png and "
        "sweep.json to output.dir/sweep.",
    )
    _add_run_args(sw, config_required=True)


def _add_checkpoint_tools(sub) -> None:
    """``inspect``, ``export-peft`` and ``merge``: commands on saved adapter checkpoints."""
    ins = sub.add_parser("inspect", help="summary table of a saved adapter",
                         description="Print an adapter checkpoint's targets (shape, rank, alpha, scale, "
                         "parameters), its config and each target's ||s·A⊗B||_F.")
    ins.add_argument("adapter", metavar="ADAPTER", help="adapter checkpoint directory (lj.checkpoint.save, "
                     "a Manager step, or output.dir/adapter of a finetune run)")

    ex = sub.add_parser("export-peft", help="write an adapter checkpoint as a PEFT adapter (safetensors)",
                        description="Convert an adapter checkpoint to adapter_config.json + "
                        "adapter_model.safetensors, loadable by Hugging Face PEFT.")
    ex.add_argument("adapter", metavar="ADAPTER", help="adapter checkpoint directory")
    ex.add_argument("out", metavar="OUT", help="output directory (created)")
    ex.add_argument("--name-map", choices=("hf", "gpt2", "bert", "llama"), default="hf",
                    help="how Flax paths become torch module names (default: hf, the Flax path without "
                    "its leaf name)")
    ex.add_argument("--base-model", default=None, help="base_model_name_or_path to record")
    ex.add_argument("--task-type", default=None, help="PEFT task_type to record, e.g. CAUSAL_LM")

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


def _run_config(ns):
    from .run_config import load

    path = ns.config
    if path is None and os.path.exists(_DEFAULT_CONFIG):
        path = _DEFAULT_CONFIG
    return load(path, ns.overrides)


def main(argv=None) -> int:
    """Entry point of the ``lora-jax`` console script.

    Commands: ``finetune [CONFIG] [--set k=v ...] [--compare-full] [--resume]``,
    ``sweep CONFIG``, ``inspect ADAPTER``, ``export-peft ADAPTER OUT``,
    ``merge BASE ADAPTER OUT`` (see :func:`lora_jax.checkpoint.merge`), ``info``.
    Bad configs and problems with checkpoints are printed to stderr as one ``error:``
    line, with exit status 1; Ctrl-C stops with one line (how to resume) and status 130.

    >>> main(["--help"])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    SystemExit: 0
    >>> main(["merge", "/no/base", "/no/adapter", "/no/out"])
    1
    >>> main(["finetune", "--set", "lora.rnak=4"])
    1
    """
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.command is None:
        parser.print_help()
        return 0
    quiet = _ThreadErrors()
    logging.getLogger("absl").addFilter(quiet)
    try:
        return _dispatch(ns)
    except OSError as e:
        if e.errno != errno.ENOSPC:
            print(f"lora-jax {ns.command}: error: {e}", file=sys.stderr)
            return 1
        print(f"lora-jax {ns.command}: error: no space left on the device (writing {_output(ns)}): "
              "free some space or write to another disk, then run the command again", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"lora-jax {ns.command}: interrupted{_RESUME_HINT.get(ns.command, '').format(out=_output(ns))}",
              file=sys.stderr)
        return 130  # 128 + SIGINT, as shells report it
    except (ValueError, TypeError) as e:
        print(f"lora-jax {ns.command}: error: {e}", file=sys.stderr)
        return 1
    finally:
        logging.getLogger("absl").removeFilter(quiet)


class _ThreadErrors(logging.Filter):
    """Drops the errors orbax's writer threads log with their tracebacks when a write fails
    (a full disk, a lost mount): the command reports that failure itself, on one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (record.levelno >= logging.ERROR and isinstance(exc, OSError))


def _output(ns) -> str:
    """Where the command ``ns`` writes, for messages."""
    if ns.command in ("merge", "export-peft"):
        return ns.out
    if ns.command in ("finetune", "sweep"):
        try:
            return f"output.dir {_run_config(ns).output.dir}"
        except (OSError, ValueError, TypeError):
            pass
    return "its outputs"


def _dispatch(ns) -> int:
    if ns.command == "info":
        import jax

        print(f"lora-jax {__version__}, jax {jax.__version__}, devices: {jax.devices()}")
        return 0
    if ns.command == "finetune":
        from .run import finetune

        finetune(_run_config(ns), compare_full=ns.compare_full, resume=ns.resume, overwrite=ns.overwrite)
        return 0
    if ns.command == "sweep":
        from .sweep import sweep

        sweep(_run_config(ns), overwrite=ns.overwrite)
        return 0
    if ns.command == "inspect":
        from .inspection import inspect_adapter

        print(inspect_adapter(ns.adapter))
        return 0
    if ns.command == "export-peft":
        from .. import checkpoint, peft

        checkpoint.check_output(ns.out, adapter=ns.adapter)
        lora = checkpoint.restore(ns.adapter)
        name_map = {"hf": peft.HF, "gpt2": peft.GPT2, "bert": peft.BERT, "llama": peft.LLAMA}[ns.name_map]
        modules = peft.save(ns.out, lora, name_map, base_model=ns.base_model, task_type=ns.task_type)
        print(f"wrote {len(modules)} PEFT modules to {ns.out}")
        return 0
    if ns.command == "merge":
        from .. import checkpoint

        paths = checkpoint.merge(ns.base, ns.adapter, ns.out)
        print(f"merged {len(paths)} adapter(s) into {ns.out}")
        return 0
    raise AssertionError(ns.command)  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())
