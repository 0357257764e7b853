"""``lora-jax finetune --set lora.dora=true`` and the sweep's DoRA settings (the DoRA series of
a real sweep is checked in tests/test_finetune.py's sweep test).

Runs use tests/test_finetune.py's tiny model (``tiny``) for a few steps; the pretrained
base is cached once for this module.
"""

import contextlib
import io
import json
import re
import shutil
from pathlib import Path

import chex
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

import lora_jax as lj
from lora_jax import checkpoint
from lora_jax.app import cli, run_config, sweep
from lora_jax.app.model import TinyLM
from test_finetune import tiny

STEPS = 4
RUN = [f"train.steps={STEPS}", "train.save_every=2", "train.keep=5"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def finetune(out, cache, *settings, resume=False) -> str:
    """One finetune through the CLI; returns what it printed."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert cli.main(["finetune", *tiny(out, cache, *RUN, *settings), *(["--resume"] if resume else [])]) == 0
    return printed.getvalue()


@pytest.fixture(scope="module")
def dora_run(tmp_path_factory, cache):
    """A DoRA finetune: its output.dir and what it printed."""
    out = tmp_path_factory.mktemp("dora") / "run"
    return out, finetune(out, cache, "lora.dora=true")


def pretrained(cache):
    return checkpoint.restore_params(next(Path(cache).glob("pretrained/*/params")))


def test_dora_run_writes_dora_adapters_and_their_merge(dora_run, tmp_path, cache):
    out, text = dora_run
    adapter = checkpoint.restore(out / "adapter")
    assert len(lj.targets(adapter)) == 12 and all(w.is_dora for _, w in lj.targets(adapter))
    # trained: the magnitudes moved off their init ||W|| and B off zero
    base = pretrained(cache)
    for path, w in lj.targets(adapter):
        kernel = base["params"][path.split("/")[1]][path.split("/")[2]]["kernel"]
        assert w.m.shape == (kernel.shape[1],)
        assert float(jnp.abs(w.m - jnp.linalg.norm(kernel, axis=0)).max()) > 0
    merged = checkpoint.restore_params(out / "merged")
    # the merge runs under jit, whose fused norm and division round apart from eager lj.merge's in
    # the last bit; a merge that ignored m or the norm would be off by far more (m has trained)
    chex.assert_trees_all_close(merged, lj.merge(base, adapter), atol=1e-6, rtol=1e-6)
    m = json.loads((out / "metrics.json").read_text())
    assert m["lora"]["dora"] is True and m["config"]["lora"]["dora"] is True
    n_m = sum(int(np.prod(w.m.shape)) for _, w in lj.targets(adapter))
    assert m["lora"]["trainable_params"] == sum(w.num_params for _, w in lj.targets(adapter))
    assert m["lora"]["trainable_params"] == n_m + sum(w.a.size + w.b.size for _, w in lj.targets(adapter))
    assert re.search(r"^ +DoRA\n.*loss before", text, re.M)  # the table's column

    # the same seed without DoRA: the key is not ignored
    plain_out = tmp_path / "plain"
    finetune(plain_out, cache)
    plain = checkpoint.restore(plain_out / "adapter")
    assert not any(w.is_dora for _, w in lj.targets(plain))
    cfg = run_config.load(out / "config.yaml")
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, cfg.model.context)), jnp.int32)
    model = TinyLM(cfg.model)
    dora_logits = model.apply(merged, ids)
    plain_logits = model.apply(checkpoint.restore_params(plain_out / "merged"), ids)
    assert float(jnp.abs(dora_logits - plain_logits).max()) > 1e-4
    chex.assert_trees_all_close(dora_logits, lj.wrap(model.apply)(base, adapter, ids), atol=1e-5, rtol=1e-5)


def test_dora_resume_matches_an_uninterrupted_run(dora_run, tmp_path, cache):
    done, _ = dora_run
    out = tmp_path / "interrupted"  # stopped after the step-2 checkpoint
    shutil.copytree(done / "checkpoints", out / "checkpoints")
    shutil.rmtree(out / "checkpoints" / str(STEPS))
    shutil.copy(done / "config.yaml", out / "config.yaml")
    assert f"resuming from step 2 of {STEPS}" in finetune(out, cache, "lora.dora=true", resume=True)
    resumed, whole = checkpoint.restore(out / "adapter"), checkpoint.restore(done / "adapter")
    assert all(w.is_dora for _, w in lj.targets(resumed))
    chex.assert_trees_all_close(resumed, whole, atol=1e-6, rtol=1e-5)
    # DoRA may not be switched on resume
    assert cli.main(["finetune", *tiny(out, cache, *RUN), "--resume"]) == 1


def test_dora_inspect_and_export_peft(dora_run, tmp_path, capsys):
    out, _ = dora_run
    assert cli.main(["inspect", str(out / "adapter")]) == 0
    text = capsys.readouterr().out
    assert text.count("linear+dora") == 12 and "DoRA: 12 of 12 targets also have a magnitude m" in text
    assert cli.main(["export-peft", str(out / "adapter"), str(tmp_path / "peft")]) == 0
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    from safetensors.numpy import load_file

    tensors = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    w = checkpoint.restore(out / "adapter")["params"]["block_1"]["up"]["kernel"]
    np.testing.assert_array_equal(tensors["base_model.model.block_1.up.lora_magnitude_vector"], np.asarray(w.m))


class _Cfg:
    def __init__(self, overrides):
        self.cfg = run_config.from_dict({}, overrides)


@pytest.mark.parametrize("on", [True, False])
def test_sweep_dora_switches_the_series(on, monkeypatch):
    # the trials' order and settings, without training: each trial's loss is its rank
    monkeypatch.setattr(sweep, "_trial", lambda s, **kw: {**kw, "target_loss": float(kw["rank"]), "runaway": False})
    rows, best = sweep._trials(_Cfg(["sweep.ranks=[1, 2]", "sweep.alpha_ratios=[2]", f"sweep.dora={on}"]), {}, None)
    got = [(r["stage"], r["scaling"], r["rank"], r["alpha"], r.get("dora", False)) for r in rows]
    assert got == [("rank", "lora", 1, 1.0, False), ("rank", "rslora", 1, 8.0, False),
                   *[("dora", "lora", 1, 1.0, True)] * on,
                   ("rank", "lora", 2, 2.0, False), ("rank", "rslora", 2, 8.0, False),
                   *[("dora", "lora", 2, 2.0, True)] * on,
                   ("alpha", "lora", 1, 2.0, False)]
    assert best == 1


@pytest.mark.parametrize(
    "settings, message",
    [
        (["lora.dora=true", "lora.method=adalora", "lora.t_init=1", "lora.t_final=1"],
         "config key lora.dora: got True; expected false with lora.method=adalora (AdaLoRA's adapters are SVD "
         "triplets without a DoRA magnitude); set lora.dora=false or lora.method=lora"),
        (["lora.dora=1"], "config key lora.dora: got 1; expected true or false"),
        (["lora.dora=dora"], "config key lora.dora: got 'dora'; expected true or false"),
        (["sweep.dora=[true]"], "config key sweep.dora: got [True]; expected true or false"),
    ],
)
def test_bad_dora_keys_are_one_error_line(settings, message, tmp_path, cache, capsys):
    assert cli.main(["finetune", *tiny(tmp_path / "run", cache, *settings)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("lora-jax finetune: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert message in err
    assert not (tmp_path / "run").exists()


def test_the_sweep_refuses_lora_dora(tmp_path, capsys):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"lora": {"dora": True}, "output": {"dir": str(tmp_path / "out")}}))
    assert cli.main(["sweep", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "lora-jax sweep: error: config key lora.dora: got True" in err
    assert "sweep.dora" in err and "lora.dora=false" in err
    assert not (tmp_path / "out").exists()
