"""Faults and bad input: every case is the right result or one clear error.

In Python a ``ValueError``/``TypeError`` that names the file, key or path, what was found
and the fix; on the command line one ``lora-jax <cmd>: error: ...`` line and status 1.
"""

import os

import pytest

from lora_jax.app import cli
from lora_jax.app.model import warmup_cosine
from test_finetune import tiny


def _cli_error(capsys, argv, *words) -> str:
    """Run the CLI in-process: status 1 and one error line holding every one of ``words``."""
    capsys.readouterr()
    assert cli.main(argv) == 1
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"lora-jax {argv[0]}: error: "), lines[0]
    for w in words:
        assert str(w) in lines[0], (w, lines[0])
    return lines[0]


# ---------------------------------------------------------------------------------------
# run settings refused before any work


def test_output_dir_that_is_a_file_or_not_writable_is_refused_first(tmp_path, capsys, monkeypatch):
    cache = tmp_path / "cache"
    f = tmp_path / "file"
    f.write_text("x")
    _cli_error(capsys, ["finetune", *tiny(f, cache)], f, "is a file")
    _cli_error(capsys, ["finetune", *tiny(f / "run", cache)], f / "run", "cannot be created")
    _cli_error(capsys, ["sweep", "configs/sweep.yaml", *tiny(f, cache)], f / "sweep")
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    _cli_error(capsys, ["finetune", *tiny(tmp_path / "ro", cache)], tmp_path / "ro", "not writable")
    assert not cache.exists()  # nothing was pretrained


@pytest.mark.parametrize("setting, words", [
    ("train.seed=100000000000000000000000", ["config key train.seed", "int64"]),
    ("pretrain.seed=9223372036854775807", ["config key pretrain.seed", "int64"]),
    ("model.d_model=1e9", ["config key model.d_model", "expected an int"]),
    ("model.d_model=100000", ["model.d_model=100000", "need about", "TiB", "available", "smaller"]),
    ("model.context=1000000", ["model.context=1000000", "activations", "available"]),
])
def test_settings_that_cannot_run_are_one_line(tmp_path, capsys, setting, words):
    out = tmp_path / "run"
    _cli_error(capsys, ["finetune", *tiny(out, tmp_path / "cache", setting)], *words)
    assert not out.exists() and not (tmp_path / "cache").exists()


def test_a_failed_sweep_leaves_no_directory(tmp_path, capsys):
    out = tmp_path / "a" / "run"
    _cli_error(capsys, ["sweep", "configs/sweep.yaml", *tiny(out, tmp_path / "cache", "lora.targets=[.*/nothing]")],
               ".*/nothing")
    assert not (tmp_path / "a").exists()


def test_one_pretraining_step_has_a_schedule():
    assert float(warmup_cosine(3e-3, 1, 1)(0)) == pytest.approx(3e-3)
    assert float(warmup_cosine(3e-3, 2, 1)(1)) == pytest.approx(3e-3)
