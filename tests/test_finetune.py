"""``lora-jax finetune`` / ``sweep`` / ``inspect`` / ``export-peft``: configs, outputs, resume.

Runs use a tiny model (a few thousand parameters, a few steps); the pretrained base is
cached once per module in a temporary cache directory.
"""

import csv
import json
import os
import shutil
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import yaml
from safetensors.numpy import load_file

import lora_jax as lj
from lora_jax import checkpoint, peft
from lora_jax.app import cli, run_config
from lora_jax.app.model import TinyLM
from lora_jax.app.run import format_table

ROOT = Path(__file__).resolve().parents[1]

TINY = [
    "model.d_model=16", "model.n_layers=2", "model.n_heads=2", "model.d_ff=32", "model.context=16",
    "pretrain.steps=3", "pretrain.batch_size=4", "data.max_bytes=60000",
    "train.batch_size=8", "train.eval_batches=2", "train.warmup=2", "train.lr=0.01", "train.progress=false",
    "lora.rank=2",
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def tiny(out, cache, *extra):
    return ["--set", f"output.dir={out}", "--set", f"output.cache_dir={cache}",
            *[a for kv in TINY for a in ("--set", kv)], *[a for kv in extra for a in ("--set", kv)]]


# ---------------------------------------------------------------------------------------
# configs


def test_default_yaml_is_the_builtin_default():
    assert run_config.load(ROOT / "configs" / "default.yaml") == run_config.RunConfig()
    assert run_config.from_dict({}) == run_config.RunConfig()
    cfg = run_config.load(ROOT / "configs" / "default.yaml")
    assert cfg.data.corpus == "stdlib" and cfg.pretrain.corpus == "pydoc" == cfg.data.source


def test_every_shipped_config_parses():
    paths = sorted((ROOT / "configs").glob("*.yaml"))
    assert len(paths) >= 2
    for path in paths:
        cfg = run_config.load(path)
        assert run_config.from_dict(run_config.to_dict(cfg)) == cfg  # round trip through plain data


def test_set_overrides_each_type(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lora:\n  rank: 4\n  alpha: 8\ntrain:\n  steps: 20\n")
    cfg = run_config.load(path, ["lora.rank=16", "train.lr=1e-3", "train.progress=false",
                                 "lora.targets=[.*/query/kernel, .*/value/kernel]", "sweep.ranks=[2, 4]",
                                 "output.cache_dir=null", "data.paths=notes.txt", "data.corpus=files"])
    assert cfg.lora.rank == 16 and cfg.lora.alpha == 8.0 and cfg.train.steps == 20
    assert cfg.train.lr == 1e-3 and isinstance(cfg.train.lr, float)
    assert cfg.train.progress is False
    assert cfg.lora.targets == (".*/query/kernel", ".*/value/kernel")
    assert cfg.sweep.ranks == (2, 4) and cfg.output.cache_dir is None
    assert cfg.data.paths == ("notes.txt",)  # one value where a list is expected
    # the later --set wins, and the file's other keys stay
    assert run_config.load(path, ["lora.rank=3", "lora.rank=5"]).lora.rank == 5
    lc = cfg.lora.lora_config()
    assert [r.pattern for r in lc.rules] == [".*/query/kernel", ".*/value/kernel"]
    assert all(r.rank == 16 and r.alpha == 8.0 for r in lc.rules)
    assert run_config.from_dict({}).lora.lora_config().rules[0].linear_only


@pytest.mark.parametrize(
    "data, overrides, message",
    [
        ({"lora": {"rnak": 4}}, [], "config key lora.rnak is unknown (did you mean lora.rank?)"),
        ({"trian": {}}, [], "config key trian is unknown (did you mean train?)"),
        ({}, ["train.steps=ten"], "config key train.steps: got 'ten'; expected an int"),
        ({}, ["train.steps=-1"], "config key train.steps: got -1; expected a positive int"),
        ({}, ["train.lr=fast"], "config key train.lr: got 'fast'; expected a finite number"),
        ({}, ["train.lr=.inf"], "config key train.lr: got inf; expected a finite number"),
        ({}, ["train.seed=-1"], "config key train.seed: got -1; expected an int >= 0"),
        ({}, ["lora.targets=['(unclosed']"], "config key lora.targets: '(unclosed' is not a valid regex"),
        ({}, ["train.progress=maybe"], "config key train.progress: got 'maybe'; expected true or false"),
        ({}, ["lora.scaling=sqrt"], "config key lora.scaling: got 'sqrt'; expected one of ('lora', 'rslora')"),
        ({}, ["lora.init=zeros"], "config key lora.init: got 'zeros'"),
        ({}, ["lora.dropout=1.5"], "config key lora.dropout: got 1.5; expected a rate in [0, 1)"),
        ({}, ["lora.targets=[all_linear, .*/q]"], "either [all_linear] alone"),
        ({}, ["model.n_heads=3"], "config key model.n_heads: got 3; expected a divisor of model.d_model=128"),
        ({}, ["data.corpus=wiki"], "config key data.corpus: got 'wiki'; expected one of ('pydoc', 'stdlib', 'files')"),
        ({}, ["data.corpus=files"], "config key data.paths"),
        ({}, ["data.heldout=1"], "expected a fraction in (0, 1)"),
        ({}, ["data.paths=[a.txt]"], "config key data.paths: got ['a.txt'], but no corpus reads them"),
        ({}, ["sweep.ranks=[4, 0]"], "config key sweep.ranks"),
        ({}, ["train.steps"], "expected section.key=value"),
        ({}, ["steps=3"], "expected section.key=value"),
        ({}, ["train.steps=[1"], "not valid YAML"),
        ({"lora": [1, 2]}, [], "config section lora: got [1, 2]; expected a mapping"),
    ],
)
def test_bad_config_is_a_clear_error(data, overrides, message):
    with pytest.raises(ValueError) as e:
        run_config.from_dict(data, overrides)
    assert message in str(e.value)


def test_bad_config_file_errors(tmp_path, capsys):
    with pytest.raises(ValueError, match="does not exist"):
        run_config.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("lora: [unclosed\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        run_config.load(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="expected a mapping of sections"):
        run_config.load(listy)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("train:\n  stepz: 3\n")
    # through the CLI: one error line naming the file and the key, exit status 1
    assert cli.main(["finetune", str(unknown)]) == 1
    err = capsys.readouterr().err
    assert "lora-jax finetune: error:" in err and str(unknown) in err and "train.stepz" in err
    assert cli.main(["sweep", str(tmp_path / "nope.yaml")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_a_target_regex_that_matches_nothing_is_an_error(tmp_path, cache, capsys):
    argv = ["finetune", *tiny(tmp_path / "run", cache, "lora.targets=[.*/nothing/kernel]")]
    assert cli.main(argv) == 1
    assert ".*/nothing/kernel" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------
# finetune


@pytest.fixture(scope="module")
def finished(tmp_path_factory, cache):
    """One reduced finetune run through the CLI, with the full fine-tune baseline."""
    out = tmp_path_factory.mktemp("ft") / "run"
    argv = ["finetune", *tiny(out, cache, "train.steps=24", "train.save_every=8", "train.keep=5"), "--compare-full"]
    assert cli.main(argv) == 0
    return out


def test_finetune_writes_every_output(finished):
    names = sorted(os.listdir(finished))
    assert names == ["adapter", "checkpoints", "config.yaml", "loss.png", "merged", "metrics.json"]
    with open(finished / "loss.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    m = json.loads((finished / "metrics.json").read_text())
    lora, full = m["lora"], m["full"]
    assert len(m["losses"]["lora"]) == 24 == len(m["losses"]["full"])
    assert np.isfinite(m["losses"]["lora"]).all()
    # the table's numbers: LoRA trains only its factors, the baseline everything
    assert lora["trainable_params"] < full["trainable_params"] == m["base"]["params"]
    assert lora["trainable_percent"] == pytest.approx(100 * lora["trainable_params"] / m["base"]["params"])
    assert lora["adapter_bytes"] == 4 * lora["trainable_params"]
    assert 0 < lora["adapter_disk_bytes"]
    assert lora["target_before"] == full["target_before"] and lora["source_before"] == full["source_before"]
    assert lora["target_after"] < lora["target_before"]  # it learned the target domain
    assert full["target_after"] < full["target_before"]
    assert lora["step_seconds"] > 0 and full["step_seconds"] > 0
    # all_linear on TinyLM: q, k, v, out, up, down of each block; not the tied embedding (the head)
    assert sorted(lora["targets"]) == sorted(
        f"params/block_{i}/{n}/kernel" for i in range(2) for n in ("query", "key", "value", "out", "up", "down")
    )
    assert yaml.safe_load((finished / "config.yaml").read_text()) == m["config"]
    assert run_config.from_dict(m["config"]).train.steps == 24
    with checkpoint.Manager(finished / "checkpoints") as mgr:
        assert mgr.all_steps() == [8, 16, 24]
    text = format_table(m)
    assert "LoRA" in text and "full FT" in text and f"{lora['target_after']:.3f}" in text


def test_merged_checkpoint_reproduces_the_adapter(finished):
    cfg = run_config.load(finished / "config.yaml")
    model = TinyLM(cfg.model)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 256, (3, cfg.model.context)), jnp.int32)
    lora = checkpoint.restore(finished / "adapter")
    assert all(float(jnp.abs(w.b).max()) > 0 for _, w in lj.targets(lora))  # trained, not the zero init
    with ocp.StandardCheckpointer() as ckptr:  # plain orbax, no lora_jax involved
        merged = ckptr.restore(finished / "merged")
    base_dir = [d for d in Path(cfg.output.cache_dir).glob("pretrained/*/params")]
    assert len(base_dir) == 1
    base = checkpoint.restore_params(base_dir[0])
    adapted = lj.wrap(model.apply)(base, lora, ids)
    chex.assert_trees_all_close(model.apply(merged, ids), adapted, atol=1e-5, rtol=1e-5)
    assert float(jnp.abs(model.apply(base, ids) - adapted).max()) > 1e-3  # the adapter changes outputs
    # and the merged tree is exactly lj.merge of the base and the adapter
    chex.assert_trees_all_close(merged, lj.merge(base, lora), atol=0, rtol=0)


def test_pissa_run_merges_into_its_residual_base(tmp_path, cache, capsys):
    out = tmp_path / "run"
    assert cli.main(["finetune", *tiny(out, cache, "train.steps=3", "lora.init=pissa")]) == 0
    assert "base" in os.listdir(out)  # the residual W - s·A⊗B the adapter belongs to
    cfg = run_config.load(out / "config.yaml")
    model = TinyLM(cfg.model)
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 256, (2, cfg.model.context)), jnp.int32)
    base = checkpoint.restore_params(out / "base")
    lora = checkpoint.restore(out / "adapter")
    merged = checkpoint.restore_params(out / "merged")
    chex.assert_trees_all_close(model.apply(merged, ids), lj.wrap(model.apply)(base, lora, ids), atol=1e-5, rtol=1e-5)
    pretrained = checkpoint.restore_params(next(Path(cache).glob("pretrained/*/params")))
    w = pretrained["params"]["block_0"]["up"]["kernel"]
    assert float(jnp.abs(base["params"]["block_0"]["up"]["kernel"] - w).max()) > 1e-3  # not the pretrained weight
    capsys.readouterr()
    assert cli.main(["inspect", str(out / "adapter")]) == 0
    assert "PiSSA: the adapter belongs to the residual base" in capsys.readouterr().out


def test_rerun_needs_resume_or_overwrite(finished, cache, capsys):
    argv = ["finetune", *tiny(finished, cache, "train.steps=24")]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "--resume" in err and "--overwrite" in err and str(finished) in err


def test_resume_continues_the_step_count_and_matches_an_uninterrupted_run(finished, tmp_path, cache):
    # a run that stopped after its step-16 checkpoint: the finished run's files, minus step 24
    out = tmp_path / "interrupted"
    shutil.copytree(finished / "checkpoints", out / "checkpoints")
    shutil.rmtree(out / "checkpoints" / "24")
    argv = ["finetune", *tiny(out, cache, "train.steps=24", "train.save_every=8", "train.keep=5"), "--resume"]
    assert cli.main(argv) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["lora"]["resumed_from"] == 16 and m["lora"]["steps"] == 24
    with checkpoint.Manager(out / "checkpoints") as mgr:
        assert mgr.all_steps() == [8, 16, 24]
    done = json.loads((finished / "metrics.json").read_text())
    # same batches, same optimizer state: the resumed run ends where the uninterrupted one did
    np.testing.assert_allclose(m["losses"]["lora"][:16], done["losses"]["lora"][:16], rtol=0)
    np.testing.assert_allclose(m["losses"]["lora"], done["losses"]["lora"], rtol=2e-5)
    chex.assert_trees_all_close(checkpoint.restore(out / "adapter"), checkpoint.restore(finished / "adapter"),
                                atol=1e-6, rtol=1e-5)


def test_resume_past_the_checkpoints_and_overwrite(tmp_path, cache, capsys):
    # the step counts (2 and 3) are those of the other runs here, whose compiled steps they reuse
    out = tmp_path / "run"
    assert cli.main(["finetune", *tiny(out, cache, "train.steps=2", "train.save_every=2")]) == 0
    # more steps than the first run: the step count continues from 2
    assert cli.main(["finetune", *tiny(out, cache, "train.steps=3", "train.save_every=2"), "--resume"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["lora"]["resumed_from"] == 2 and len(m["losses"]["lora"]) == 3
    with checkpoint.Manager(out / "checkpoints") as mgr:
        assert mgr.all_steps() == [2, 3]
    # fewer steps than the checkpoints hold is refused
    assert cli.main(["finetune", *tiny(out, cache, "train.steps=2"), "--resume"]) == 1
    assert "train.steps=2" in capsys.readouterr().err
    assert cli.main(["finetune", *tiny(out, cache, "train.steps=2"), "--overwrite"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["lora"]["resumed_from"] == 0 and len(m["losses"]["lora"]) == 2
    with checkpoint.Manager(out / "checkpoints") as mgr:
        assert mgr.all_steps() == [2]


def test_finetune_on_user_files(tmp_path, cache):
    text_dir = tmp_path / "notes"
    text_dir.mkdir()
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "lora", "jax"]
    for i in range(6):
        (text_dir / f"n{i}.txt").write_text(" ".join(rng.choice(words, 800)))
    out = tmp_path / "run"
    argv = ["finetune", *tiny(out, cache, "train.steps=3", "data.corpus=files", f"data.paths=[{text_dir}/*.txt]")]
    assert cli.main(argv) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["domains"] == {"target": "files", "source": "pydoc"}
    assert cli.main(["finetune", *tiny(tmp_path / "r2", cache, "data.corpus=files", "data.paths=[/no/such/*.txt]")]) == 1


# ---------------------------------------------------------------------------------------
# inspect, export-peft


def test_inspect_prints_the_adapter_table(finished, capsys):
    assert cli.main(["inspect", str(finished / "adapter")]) == 0
    out = capsys.readouterr().out
    lora = checkpoint.restore(finished / "adapter")
    for path, w in lj.targets(lora):
        row = next(line for line in out.splitlines() if line.startswith(path + " "))
        assert f" {w.rank} " in row and f"{float(w.delta_norm()):.4g}" in row
    total = sum(w.num_params for _, w in lj.targets(lora))
    assert f"trainable params: {total:,}" in out
    assert "scaling=lora" in out
    assert cli.main(["inspect", str(finished / "nothing")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_export_peft_round_trips(finished, tmp_path, capsys):
    out = tmp_path / "peft"
    assert cli.main(["export-peft", str(finished / "adapter"), str(out), "--task-type", "CAUSAL_LM"]) == 0
    lora = checkpoint.restore(finished / "adapter")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 2 and config["task_type"] == "CAUSAL_LM" and config["use_rslora"] is False
    tensors = load_file(str(out / "adapter_model.safetensors"))
    w = lora["params"]["block_1"]["up"]["kernel"]
    assert len(tensors) == 2 * len(lj.targets(lora))
    # PEFT's layouts for a (16, 32) kernel: lora_A (r, in), lora_B (out, r), scale folded in neither
    np.testing.assert_array_equal(tensors["base_model.model.block_1.up.lora_A.weight"], np.asarray(w.a))
    np.testing.assert_array_equal(tensors["base_model.model.block_1.up.lora_B.weight"], np.asarray(w.b).T)
    cfg = run_config.load(finished / "config.yaml")
    params = jax.eval_shape(TinyLM(cfg.model).init, jax.random.key(0), jnp.zeros((1, 16), jnp.int32))
    back = peft.load(out, params, peft.HF)
    chex.assert_trees_all_close(lj.merge(jax.tree.map(jnp.zeros_like, params), back),
                                lj.merge(jax.tree.map(jnp.zeros_like, params), lora), atol=1e-6)
    assert w.rank == 2


# ---------------------------------------------------------------------------------------
# sweep


@pytest.mark.slow
def test_sweep_writes_tables_and_plots(tmp_path, cache, capsys):
    cfg_path = tmp_path / "sweep.yaml"
    # runaway: a threshold between the trials' norms, so that some are flagged and some not;
    # sweep.dora (the default) adds a DoRA trial at each rank
    cfg_path.write_text(yaml.safe_dump({"sweep": {"ranks": [1, 4], "alpha_ratios": [0.5, 1], "steps": 4,
                                                  "norm_every": 2, "rslora_alpha": 2.0, "runaway": 0.015}}))
    assert cli.main(["sweep", str(cfg_path), *tiny(tmp_path / "run", cache)]) == 0
    out = tmp_path / "run" / "sweep"
    assert sorted(os.listdir(out)) == ["delta_norms.png", "loss_vs_rank.png", "results.csv", "results.md", "sweep.json"]
    result = json.loads((out / "sweep.json").read_text())
    rows = result["rows"]
    stage1 = [(r["scaling"], r["rank"], r["alpha"]) for r in rows if r["stage"] == "rank"]
    assert stage1 == [("lora", 1, 1.0), ("rslora", 1, 2.0), ("lora", 4, 4.0), ("rslora", 4, 2.0)]
    # the best rank: lowest held-out loss among the alpha = r trials that did not run away
    lora_rows = [r for r in rows if r["stage"] == "rank" and r["scaling"] == "lora"]
    best = min([r for r in lora_rows if not r["runaway"]] or lora_rows, key=lambda r: r["target_loss"])
    assert result["best_rank"] == best["rank"]
    stage2 = [(r["rank"], r["alpha"]) for r in rows if r["stage"] == "alpha"]
    assert stage2 == [(best["rank"], 0.5 * best["rank"]), (best["rank"], 1.0 * best["rank"])]
    for r in rows:
        scale = r["alpha"] / (r["rank"] if r["scaling"] == "lora" else np.sqrt(r["rank"]))
        assert r["scale"] == pytest.approx(scale)
        assert [n[0] for n in r["norms"]] == [2, 4] and r["norms"][-1][1] > 0  # ||s·A⊗B|| logged, non-zero
        assert r["max_delta_ratio"] == max(n[1] for n in r["norms"])
        assert r["runaway"] == (r["max_delta_ratio"] > 0.015)
    assert {r["runaway"] for r in rows} == {True, False}  # both sides of the threshold were seen
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [float(t["target_loss"]) for t in table] == pytest.approx([r["target_loss"] for r in rows])
    # the DoRA series: each rank's alpha = r trial again, with a magnitude per output
    dora = [r for r in rows if r["stage"] == "dora"]
    assert [(r["scaling"], r["rank"], r["alpha"], r["dora"]) for r in dora] == [("lora", 1, 1.0, True),
                                                                                 ("lora", 4, 4.0, True)]
    assert not any(r["dora"] for r in rows if r["stage"] != "dora")
    assert [e["rank"] for e in result["series"]["DoRA"]] == [1, 4]
    assert [e["target_loss"] for e in result["series"]["DoRA"]] == [r["target_loss"] for r in dora]
    plain = {r["rank"]: r for r in lora_rows}
    for r in dora:  # the same factors plus magnitudes, trained differently
        assert r["trainable_params"] > plain[r["rank"]]["trainable_params"]
        assert r["target_loss"] != plain[r["rank"]]["target_loss"]
    md = (out / "results.md").read_text()
    assert sum(line.startswith("| ") for line in md.splitlines()) == len(rows) + 1  # header + one per trial
    assert sum(line.startswith("| dora | lora | True |") for line in md.splitlines()) == 2
    assert "- r=4: LoRA" in md and "DoRA" in md.split("- r=4:")[1].splitlines()[0]
    assert cli.main(["sweep", str(cfg_path), *tiny(tmp_path / "run", cache)]) == 1  # results exist
    assert "--overwrite" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------
# paths, failed runs, resume safety, the cache


def test_relative_paths_work_everywhere(tmp_path, cache, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["finetune", "--set", "output.dir=runs/rel", "--set", "output.cache_dir=relcache",
            *[a for kv in TINY for a in ("--set", kv)], "--set", "train.steps=2"]
    assert cli.main(argv) == 0
    assert (tmp_path / "relcache").is_dir() and (tmp_path / "runs" / "rel" / "merged").is_dir()
    assert cli.main(["inspect", "runs/rel/adapter"]) == 0
    assert cli.main(["export-peft", "runs/rel/adapter", "peft_out"]) == 0
    base = next(Path("relcache").glob("pretrained/*/params"))  # a relative path
    assert cli.main(["merge", str(base), "runs/rel/adapter", "merged_again"]) == 0
    chex.assert_trees_all_equal(checkpoint.restore_params("merged_again"), checkpoint.restore_params("runs/rel/merged"))


def test_a_failed_run_writes_nothing_and_a_failed_resume_keeps_the_outputs(tmp_path, cache, capsys):
    out = tmp_path / "run"
    assert cli.main(["finetune", *tiny(out, cache, "lora.targets=[.*/nothing]")]) == 1
    assert not out.exists()  # the error came before anything was written: a fixed rerun just works
    assert cli.main(["finetune", *tiny(out, cache, "train.steps=3")]) == 0
    before = sorted(os.listdir(out))
    capsys.readouterr()
    assert cli.main(["finetune", *tiny(out, cache, "train.steps=2"), "--resume"]) == 1  # fewer steps
    assert "train.steps=2" in capsys.readouterr().err
    assert cli.main(["finetune", *tiny(out, cache, "train.steps=6", "lora.rank=3"), "--resume"]) == 1
    err = capsys.readouterr().err
    assert "lora.rank (2 -> 3)" in err and "only train.keep, train.progress, train.save_every, train.steps" in err
    assert cli.main(["finetune", *tiny(out, cache, "train.steps=3"), "--resume", "--overwrite"]) == 1
    assert sorted(os.listdir(out)) == before  # nothing was deleted by the refused runs
    assert run_config.load(out / "config.yaml").train.steps == 3


def test_resuming_a_finished_run_rewrites_its_outputs_with_valid_json(tmp_path, cache):
    out = tmp_path / "run"
    assert cli.main(["finetune", *tiny(out, cache, "train.steps=2")]) == 0
    assert cli.main(["finetune", *tiny(out, cache, "train.steps=2"), "--resume"]) == 0
    text = (out / "metrics.json").read_text()
    m = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in metrics.json"))
    assert m["lora"]["resumed_from"] == 2 and m["lora"]["step_seconds"] is None
    assert "n/a" in format_table(m)


def test_one_step_without_warmup_trains():
    from lora_jax.app.train import _schedule

    assert float(_schedule(0.01, 1, 0)(0)) == pytest.approx(0.01)
    assert float(_schedule(0.01, 10, 4)(0)) == 0.0 and float(_schedule(0.01, 10, 4)(4)) == pytest.approx(0.01)
    assert float(_schedule(0.01, 10, 100)(5)) == pytest.approx(0.01)  # warmup capped at half the steps


def test_the_cache_key_covers_the_training_text():
    from lora_jax.app.model import _cache_key

    m, p = run_config.ModelConfig(), run_config.PretrainConfig()
    text = np.frombuffer(b"some text " * 100, np.uint8)
    other = text.copy()
    other[5] ^= 1  # same length, one byte different
    assert _cache_key(m, p, text) == _cache_key(m, p, text.copy())
    assert _cache_key(m, p, text) != _cache_key(m, p, other)
    assert _cache_key(m, p, text) != _cache_key(m, p, text[:-1])
    assert _cache_key(m, p, text) != _cache_key(run_config.ModelConfig(d_model=64), p, text)


@pytest.mark.slow
def test_processes_pretraining_one_cache_entry_at_once_agree(tmp_path):
    import subprocess
    import sys

    script = (
        "import sys, jax, numpy as np\n"
        "from lora_jax.app.run_config import ModelConfig, PretrainConfig\n"
        "from lora_jax.app.data import load_corpus\n"
        "from lora_jax.app.model import pretrained\n"
        "m = ModelConfig(d_model=16, n_layers=1, n_heads=2, d_ff=32, context=16)\n"
        "c = load_corpus('pydoc', max_bytes=30000, context=16)\n"
        "v, where, info = pretrained(m, PretrainConfig(steps=20, batch_size=4), c, cache_dir=sys.argv[1],"
        " progress=False, log=None)\n"
        "np.save(sys.argv[2], np.asarray(v['params']['embed']['embedding']))\n"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "cache"), str(tmp_path / f"w{i}.npy")],
                              env=env, stderr=subprocess.PIPE, text=True) for i in range(3)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errors
    w = [np.load(tmp_path / f"w{i}.npy") for i in range(3)]
    np.testing.assert_array_equal(w[0], w[1])
    np.testing.assert_array_equal(w[0], w[2])
    entries = list((tmp_path / "cache" / "pretrained").iterdir())
    assert len(entries) == 1 and sorted(os.listdir(entries[0])) == ["info.json", "params"]  # no temporaries left
