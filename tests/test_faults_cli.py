"""``lora-jax finetune`` under faults: an interrupt just after a checkpoint, a damaged loss
history, two runs on one output.dir at once, Ctrl-C in the middle of a run.

Every run here shares one pretrained model (a module-scoped cache; the first test makes it)
and uses tests/test_finetune.py's settings exactly, so that compilations serve both files: the
processes started here share this process's compilation cache.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from lora_jax import checkpoint
from test_finetune import tiny

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_an_interrupt_just_after_a_checkpoint_keeps_the_whole_loss_curve(tmp_path, cache, capsys, monkeypatch):
    from lora_jax.app import cli

    out = tmp_path / "run"
    settings = lambda steps: tiny(out, cache, f"train.steps={steps}", "train.save_every=2", "train.keep=5")
    save = checkpoint.Manager.save

    def save_then_interrupt(self, step, *args, **kwargs):
        save(self, step, *args, **kwargs)
        if step == 4:  # the checkpoint of step 4 is committed, nothing after it ran
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.Manager, "save", save_then_interrupt)
    assert cli.main(["finetune", *settings(6)]) == 130
    assert _one_line(capsys.readouterr().err).startswith("lora-jax finetune: interrupted;")
    monkeypatch.undo()
    losses = json.loads((out / "checkpoints" / "history.json").read_text())["losses"]
    assert len(losses) == 4
    assert cli.main(["finetune", *settings(6), "--resume"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["lora"]["resumed_from"] == 4 and len(m["losses"]["lora"]) == 6 and m["losses"]["lora"][:4] == losses
    # a damaged or short loss history is named, not a JSON traceback
    capsys.readouterr()
    for text in ('{"step": 6, "losses": [1.0, ', '[1, 2]', '{"losses": [1.0]}', '{"losses": "x"}', '{}'):
        (out / "checkpoints" / "history.json").write_text(text)
        assert cli.main(["finetune", *settings(8), "--resume"]) == 1
        line = _one_line(capsys.readouterr().err)
        assert line.startswith("lora-jax finetune: error: ") and str(out / "checkpoints" / "history.json") in line
        assert "--overwrite" in line or "delete it" in line


def _start(*argv):
    import jax

    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": os.pathsep.join(sys.path),
           "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir or "",
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": str(jax.config.jax_persistent_cache_min_compile_time_secs)}
    return subprocess.Popen([sys.executable, "-m", "lora_jax.app.cli", *argv], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_second_run_on_one_output_dir_is_refused_and_ctrl_c_stops_cleanly(tmp_path, cache):
    """Two runs started together on one output.dir: one is refused at once; the other is
    stopped with Ctrl-C after a checkpoint (one line, status 130) and resumes to a whole run."""
    from lora_jax.app import cli

    out = tmp_path / "run"
    argv = ["finetune", *tiny(out, cache, "train.steps=2000", "train.save_every=1", "train.keep=2")]
    procs = [_start(*argv), _start(*argv)]
    deadline = time.monotonic() + 180
    while not any(p.poll() is not None for p in procs):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    refused, = [p for p in procs if p.poll() is not None]
    running, = [p for p in procs if p is not refused]
    err = refused.communicate()[1]
    assert refused.returncode == 1, err
    line = _one_line(err)
    assert line.startswith(f"lora-jax finetune: error: output.dir {out} is in use by another run")
    while not (out / "checkpoints" / "history.json").exists():  # written with each checkpoint
        assert running.poll() is None and time.monotonic() < deadline, running.communicate()
        time.sleep(0.05)
    running.send_signal(signal.SIGINT)
    err = running.communicate(timeout=60)[1]
    assert running.returncode == 130, err
    line = _one_line(err)
    assert line.startswith("lora-jax finetune: interrupted;") and "--resume" in line
    with checkpoint.Manager(out / "checkpoints") as mgr:
        done = mgr.latest_step()
    assert 0 < done < 2000
    # the interrupted run continues from its last checkpoint to whole, consistent outputs
    steps = done + 2
    settings = tiny(out, cache, f"train.steps={steps}", "train.save_every=1", "train.keep=2")
    assert cli.main(["finetune", *settings, "--resume"]) == 0
    assert sorted(os.listdir(out)) == ["adapter", "checkpoints", "config.yaml", "loss.png", "merged", "metrics.json"]
    m = json.loads((out / "metrics.json").read_text())
    assert m["lora"]["resumed_from"] >= done and len(m["losses"]["lora"]) == steps
    with checkpoint.Manager(out / "checkpoints") as mgr:
        assert mgr.latest_step() == steps
    assert [t["path"] for t in checkpoint.metadata(out / "adapter")["targets"]] == m["lora"]["targets"]
