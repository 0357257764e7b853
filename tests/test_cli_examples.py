"""The console entry point and the examples (smoke-run on reduced settings)."""

import subprocess
import sys

import pytest

from lora_jax.app import cli


def test_cli_prints_help(capsys):
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    assert "usage: lora-jax" in out
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert "lora-jax 0.1.0" in capsys.readouterr().out


def test_cli_module_runs():
    r = subprocess.run([sys.executable, "-m", "lora_jax.app.cli", "--help"], capture_output=True, text=True, check=True)
    assert "Low-rank adaptation" in r.stdout


def test_linen_quickstart_learns_and_merges(capsys):
    import linen_quickstart

    result = linen_quickstart.main(steps=60)
    assert result["after"] < 0.7 * result["before"]
    assert abs(result["merged"] - result["after"]) < 0.1 * result["before"]
    assert "trainable params" in capsys.readouterr().out
