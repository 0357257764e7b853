"""``lora-jax finetune --set lora.method=adalora``: the budget keys, the run, its outputs, resume.

Runs use tests/test_finetune.py's tiny model (``tiny``) at initial rank 4, cut to an average
of 2 over 12 steps; the pretrained base is cached once for this module.
"""

import contextlib
import io
import json
import re
import shutil
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

import lora_jax as lj
from lora_jax import checkpoint
from lora_jax.app import cli, run_config
from lora_jax.app.model import TinyLM
from lora_jax.app.run import _check_resumable
from lora_jax.app.train import Setup, lora_optimizer, train_lora
from lora_jax.config import path_str
from lora_jax.weight import is_adalora
from test_finetune import tiny

STEPS = 12
ADALORA = ["lora.method=adalora", "lora.rank=4", "lora.target_rank=2", "lora.t_init=2", "lora.t_final=3",
           "lora.delta_t=2", f"train.steps={STEPS}", "train.save_every=6", "train.keep=5"]
N_TARGETS = 12  # q, k, v, out, up, down of TinyLM's 2 blocks


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def ada_run(tmp_path_factory, cache):
    """One AdaLoRA finetune through the CLI: its output.dir and what it printed."""
    out = tmp_path_factory.mktemp("ada") / "run"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert cli.main(["finetune", *tiny(out, cache, *ADALORA)]) == 0
    return out, printed.getvalue()


def printed_ranks(text: str) -> dict[str, tuple[int, int]]:
    """``{path: (initial, kept)}`` from the run's AdaLoRA table."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("AdaLoRA target"))
    rows = {}
    for line in lines[start + 1:]:
        m = re.fullmatch(r"(\S+)\s+(\d+)\s+(\d+)", line)
        if not m:
            break
        rows[m[1]] = (int(m[2]), int(m[3]))
    return rows


def last_checkpoint(out: Path):
    """The AdaLoRA adapters and optimizer state of the run's last checkpoint."""
    cfg = run_config.load(out / "config.yaml")
    with checkpoint.Manager(out / "checkpoints") as mgr:
        lora = mgr.restore().lora
        return mgr.restore(lora=lora, opt_state=jax.eval_shape(lora_optimizer(cfg).init, lora))


def test_adalora_run_writes_a_plain_adapter_of_the_kept_ranks(ada_run):
    out, text = ada_run
    ranks = printed_ranks(text)
    assert sorted(ranks) == sorted(f"params/block_{i}/{n}/kernel" for i in range(2)
                                   for n in ("query", "key", "value", "out", "up", "down"))
    assert {initial for initial, _ in ranks.values()} == {4}
    kept = {p: k for p, (_, k) in ranks.items()}
    # the budget: 48 triplets at the start, target_rank x targets at the end
    assert sum(kept.values()) == 2 * N_TARGETS
    assert f"kept ranks: {2 * N_TARGETS} of {4 * N_TARGETS} (target_rank 2 x {N_TARGETS} targets)" in text
    # the written adapter is plain LoRA, each target at its kept rank (a target with nothing
    # kept is a rank-1 adapter of zeros)
    adapter = checkpoint.restore(out / "adapter")
    assert all(lj.is_lora(w) for w in jax.tree.leaves(adapter, is_leaf=lambda x: lj.is_lora(x) or is_adalora(x)))
    assert not any("lam" in e for e in checkpoint.metadata(out / "adapter")["targets"])
    assert {p: w.rank for p, w in lj.targets(adapter)} == {p: max(k, 1) for p, k in kept.items()}
    assert any(float(w.delta_norm()) > 0 for _, w in lj.targets(adapter))  # trained, not the zero init
    m = json.loads((out / "metrics.json").read_text())
    assert {r["path"]: (r["initial"], r["kept"]) for r in m["lora"]["adalora"]["ranks"]} == ranks
    assert len(m["losses"]["lora"]) == STEPS and np.isfinite(m["losses"]["lora"]).all()
    assert re.search(r"^ +AdaLoRA\n.*loss before", text, re.M)  # the table's column
    # the printed ranks are the allocator's, and the adapter its kept triplets
    ckpt = last_checkpoint(out)
    assert ckpt.step == STEPS
    allocated = jax.tree_util.tree_flatten_with_path(lj.adalora.ranks(ckpt.lora, ckpt.opt_state))[0]
    assert {path_str(p): k for p, k in allocated} == kept
    chex.assert_trees_all_close(lj.adalora.to_lora(ckpt.lora, ckpt.opt_state), adapter, atol=0, rtol=0)


def test_adalora_merged_checkpoint_is_the_trained_model(ada_run):
    out, _ = ada_run
    cfg = run_config.load(out / "config.yaml")
    model = TinyLM(cfg.model)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 256, (3, cfg.model.context)), jnp.int32)
    base = checkpoint.restore_params(next(Path(cfg.output.cache_dir).glob("pretrained/*/params")))
    merged = checkpoint.restore_params(out / "merged")
    ckpt = last_checkpoint(out)  # the SVD-form adapters, masked triplets at lambda = 0
    trained = jax.jit(lj.wrap(model.apply))(base, ckpt.lora, ids)
    chex.assert_trees_all_close(model.apply(merged, ids), trained, atol=1e-5, rtol=1e-5)
    assert float(jnp.abs(model.apply(base, ids) - trained).max()) > 1e-4  # the adapter changes outputs


def test_adalora_export_peft_records_the_kept_ranks(ada_run, tmp_path, capsys):
    out, text = ada_run
    assert cli.main(["export-peft", str(out / "adapter"), str(tmp_path / "peft")]) == 0
    c = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    ranks = {p.split("/")[1] + "." + p.split("/")[2]: max(k, 1) for p, (_, k) in printed_ranks(text).items()}
    assert {m: c["rank_pattern"].get(m, c["r"]) for m in ranks} == ranks


def test_the_orthogonality_regularizer_trains_but_is_not_in_the_loss_curve(cache):
    def trained(weight):
        # the values of tiny's --set pairs, as a config for Setup
        cfg = run_config.from_dict({}, [*tiny("unused", cache, *ADALORA, "train.steps=3", "lora.t_init=0",
                                              "lora.t_final=1", "train.warmup=0", "train.lr=0.05",
                                              f"lora.orth_reg_weight={weight}")][1::2])
        s = Setup(cfg, log=None)
        base, lora = s.split()
        lora, _, history, _ = train_lora(s, base, lora, steps=3)
        return float(lj.adalora.orth_reg(lora)), history

    (reg0, losses0), (reg1, losses1) = trained(0.0), trained(10.0)
    assert losses0[0] == losses1[0]  # the same first step: lambda = 0, the base's loss, no regularizer in it
    assert reg1 < 0.8 * reg0  # the weighted regularizer pulled P and Q towards orthonormal rows


def test_adalora_resume_matches_an_uninterrupted_run(ada_run, tmp_path, cache):
    done, text = ada_run
    # a run that stopped after its step-6 checkpoint, before the final ranks were fixed
    out = tmp_path / "interrupted"
    shutil.copytree(done / "checkpoints", out / "checkpoints")
    shutil.rmtree(out / "checkpoints" / str(STEPS))
    shutil.copy(done / "config.yaml", out / "config.yaml")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert cli.main(["finetune", *tiny(out, cache, *ADALORA), "--resume"]) == 0
    assert f"resuming from step 6 of {STEPS}" in printed.getvalue()
    assert printed_ranks(printed.getvalue()) == printed_ranks(text)
    chex.assert_trees_all_close(checkpoint.restore(out / "adapter"), checkpoint.restore(done / "adapter"),
                                atol=1e-6, rtol=1e-5)


def test_adalora_resume_refuses_a_new_step_count(ada_run, tmp_path, cache, capsys):
    done, _ = ada_run
    out = tmp_path / "run"
    shutil.copytree(done, out)
    assert cli.main(["finetune", *tiny(out, cache, *ADALORA, f"train.steps={STEPS + 4}"), "--resume"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "train.steps" in err and "rank budget" in err
    with checkpoint.Manager(out / "checkpoints") as mgr:
        assert mgr.latest_step() == STEPS  # nothing trained


def test_resume_accepts_a_run_saved_before_the_adalora_keys(tmp_path):
    cfg = run_config.from_dict({}, ["train.steps=5"])
    old = run_config.to_dict(cfg)
    for key in ("method", "target_rank", "t_init", "t_final", "delta_t", "beta1", "beta2", "orth_reg_weight"):
        del old["lora"][key]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    _check_resumable(str(tmp_path), cfg)  # the missing keys had their defaults
    with pytest.raises(ValueError, match=r"lora.method \('lora' -> 'adalora'\)"):
        _check_resumable(str(tmp_path), run_config.from_dict({}, ["train.steps=5", "lora.method=adalora",
                                                                  "lora.t_init=1", "lora.t_final=1"]))


@pytest.mark.parametrize(
    "settings, message",
    [
        (["lora.init=pissa"], "config key lora.init: got 'pissa'; expected 'default' with lora.method=adalora"),
        (["lora.init=gaussian"], "config key lora.init: got 'gaussian'; expected 'default' with lora.method=adalora"),
        (["lora.target_rank=5"], "config key lora.target_rank: got 5; expected at most lora.rank=4"),
        (["lora.target_rank=0"], "config key lora.target_rank: got 0; expected a positive int"),
        (["lora.t_init=6", "lora.t_final=6"], "config key lora.t_final: got lora.t_init=6 + lora.t_final=6 = 12 "
                                              "with train.steps=12"),
        (["lora.t_final=0"], "config key lora.t_final: got 0; expected an int >= 1 with lora.method=adalora"),
        (["lora.t_init=-1"], "config key lora.t_init: got -1; expected an int >= 0"),
        (["lora.delta_t=0"], "config key lora.delta_t: got 0; expected a positive int"),
        (["lora.beta1=1.0"], "config key lora.beta1: got 1.0; expected a smoothing factor in [0, 1)"),
        (["lora.beta2=-0.1"], "config key lora.beta2: got -0.1; expected a smoothing factor in [0, 1)"),
        (["lora.orth_reg_weight=-1"], "config key lora.orth_reg_weight: got -1.0; expected a float >= 0"),
        (["lora.method=svd"], "config key lora.method: got 'svd'; expected one of ('lora', 'adalora')"),
        (["lora.target_rnak=2"], "config key lora.target_rnak is unknown (did you mean lora.target_rank?)"),
        (["lora.t_init=two"], "config key lora.t_init: got 'two'; expected an int"),
    ],
)
def test_bad_adalora_keys_are_one_error_line(settings, message, tmp_path, cache, capsys):
    assert cli.main(["finetune", *tiny(tmp_path / "run", cache, *ADALORA, *settings)]) == 1
    captured = capsys.readouterr()
    assert captured.err == f"lora-jax finetune: error: {captured.err.split('error: ', 1)[1]}"
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err
    assert message in captured.err
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_the_sweep_refuses_adalora(tmp_path, capsys):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"lora": {"method": "adalora"}, "output": {"dir": str(tmp_path / "out")}}))
    assert cli.main(["sweep", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "lora-jax sweep: error: config key lora.method: got 'adalora'" in err
    assert not (tmp_path / "out").exists()


def test_adalora_keys_default_and_are_ignored_by_plain_lora():
    cfg = run_config.from_dict({})
    assert cfg.lora.method == "lora" and cfg.lora.orth_reg_weight == 0.5
    # plain LoRA does not read the budget: a target_rank above the rank is no error there
    assert run_config.from_dict({}, ["lora.rank=2", "lora.target_rank=4"]).lora.target_rank == 4
    assert run_config.load(Path(__file__).resolve().parents[1] / "configs" / "default.yaml") == cfg
