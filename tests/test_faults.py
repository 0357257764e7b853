"""Faults and bad input: every case is the right result or one clear error.

In Python a ``ValueError``/``TypeError`` that names the file, key or path, what was found
and the fix; on the command line one ``lora-jax <cmd>: error: ...`` line and status 1.
"""

import gc
import json
import os
import shutil

import jax
import jax.numpy as jnp
import pytest

import lora_jax as lj
from lora_jax import checkpoint
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


# ---------------------------------------------------------------------------------------
# adapter checkpoints whose metadata cannot be trusted


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """An adapter checkpoint (alpha 4, rank 2: scale 2) of a two-target tree."""
    params = {"w": jnp.ones((8, 6)), "layers": [{"k": jnp.ones((6, 4))}], "b": jnp.ones(4)}
    cfg = lj.LoraConfig(rules=(lj.Rule("w|layers/0/k", rank=2, alpha=4.0),))
    _, lora = lj.split(jax.random.key(0), params, cfg)
    path = tmp_path_factory.mktemp("adapter") / "adapter"
    checkpoint.save(path, lora, cfg)
    return path


def _set(path, value):
    """A damage: ``meta`` with the field at ``path`` (keys and indices) set, or deleted (``_DEL``)."""
    def damage(meta):
        node = meta
        for k in path[:-1]:
            node = node[k]
        if value is _DEL:
            del node[path[-1]]
        else:
            node[path[-1]] = value
        return meta
    return damage


_DEL = object()


def _deep(n):
    node = {"target": 0}
    for _ in range(n):
        node = {"list": [node]}
    return node


DAMAGES = {
    "targets missing": _set(["targets"], _DEL),
    "targets an object": _set(["targets"], {"w": 1}),
    "targets empty": _set(["targets"], []),
    "target a string": _set(["targets", 0], "w"),
    "path a number": _set(["targets", 0, "path"], 5),
    "weight missing": _set(["targets", 0, "weight"], _DEL),
    "weight a list": _set(["targets", 0, "weight"], []),
    "scale missing": _set(["targets", 0, "weight", "scale"], _DEL),
    "scale 10 for alpha 4, rank 2": _set(["targets", 0, "weight", "scale"], 10.0),
    "scale NaN": _set(["targets", 0, "weight", "scale"], float("nan")),
    "scale a string": _set(["targets", 0, "weight", "scale"], "2"),
    "alpha negative": _set(["targets", 0, "weight", "alpha"], -4.0),
    "rank 3": _set(["targets", 0, "weight", "rank"], 3),
    "rank true": _set(["targets", 0, "weight", "rank"], True),
    "dropout 2": _set(["targets", 0, "weight", "dropout"], 2.0),
    "kind unknown": _set(["targets", 0, "weight", "kind"], "attention"),
    "scaling unknown": _set(["targets", 0, "weight", "scaling"], "sqrt"),
    "scale_fixed a string": _set(["targets", 0, "scale_fixed"], "no"),
    "scale_fixed for a known rule": _set(["targets", 0, "scale_fixed"], True),
    "axes repeated": _set(["targets", 0, "weight", "in_axes"], [1]),
    "axes a number": _set(["targets", 0, "weight", "out_axes"], 1),
    "weight shape of another rank": _set(["targets", 0, "weight", "shape"], [8]),
    "weight shape other sizes": _set(["targets", 0, "weight", "shape"], [8, 9]),
    "factor a missing": _set(["targets", 0, "a"], _DEL),
    "factor a shape": _set(["targets", 0, "a", "shape"], [2, 9]),
    "factor dtype int8": _set(["targets", 0, "a", "dtype"], "int8"),
    "factor dtype float16 (stored float32)": _set(["targets", 1, "b", "dtype"], "float16"),
    "factor dtype unknown": _set(["targets", 0, "a", "dtype"], "bogus"),
    "two targets, one path": _set(["targets", 1, "path"], "layers/0/k"),
    "one target fewer than stored": lambda m: {**m, "targets": m["targets"][:1],
                                               "structure": {"dict": [["w", {"target": 0}]]}},
    "format missing": _set(["format"], _DEL),
    "structure missing": _set(["structure"], _DEL),
    "structure a string": _set(["structure"], "dict"),
    "structure target out of range": _set(["structure"], {"dict": [["w", {"target": 5}], ["x", {"target": 1}]]}),
    "structure target twice": _set(["structure"], {"list": [{"target": 0}, {"target": 0}]}),
    "structure unknown kind": _set(["structure"], {"set": []}),
    "structure pairs wrong": _set(["structure"], {"dict": [["w"]]}),
    "structure nested 300 deep": _set(["structure"], _deep(300)),
    "config a list": _set(["config"], [1]),
}

TEXTS = {
    "truncated": lambda text: text[: len(text) // 2],
    "empty": lambda text: "",
    "not JSON": lambda text: "garbage",
    "a list": lambda text: "[1, 2]",
    "null": lambda text: "null",
    "nested 100000 deep": lambda text: "[" * 100_000 + "]" * 100_000,
    "not UTF-8": lambda text: text.replace("targets", "t\udcffrgets"),
}


def _damaged(saved, tmp_path, name):
    path = tmp_path / "adapter"
    shutil.copytree(saved, path)
    file = path / "lora_jax" / "metadata"
    text = file.read_text()
    if name in TEXTS:
        file.write_bytes(TEXTS[name](text).encode("utf-8", "surrogateescape"))
    else:
        file.write_text(json.dumps(DAMAGES[name](json.loads(text))))
    return path, file


@pytest.mark.parametrize("name", [*DAMAGES, *TEXTS])
def test_damaged_adapter_metadata_is_a_value_error_naming_the_file(saved, tmp_path, name):
    path, file = _damaged(saved, tmp_path, name)
    for read in (checkpoint.restore, checkpoint.metadata):
        if read is checkpoint.metadata and "stored" in name:
            continue  # the metadata alone is consistent; only the arrays beside it differ
        with pytest.raises(ValueError) as e:
            read(path)
        assert str(path) in str(e.value) and ("damaged" in str(e.value) or "format" in str(e.value)), str(e.value)
        if "stored" not in name:
            assert str(file) in str(e.value)


def test_the_saved_adapter_itself_restores(saved):
    lora = checkpoint.restore(saved)
    assert lora["w"].scale == 2.0 and lora["layers"][0]["k"].a.dtype == jnp.float32


def test_a_file_given_as_a_checkpoint_is_named_as_a_file(saved, tmp_path, capsys):
    f = tmp_path / "adapter.bin"
    f.write_bytes(b"\0" * 10)
    for read in (checkpoint.restore, checkpoint.metadata, checkpoint.restore_params):
        with pytest.raises(ValueError, match="is a file, not a checkpoint directory") as e:
            read(f)
        assert str(f) in str(e.value)
    _cli_error(capsys, ["merge", str(f), str(saved), str(tmp_path / "out")], f, "is a file, not a checkpoint directory")
    _cli_error(capsys, ["inspect", str(f)], f, "is a file")


# orbax's failed reads leave coroutines that may be collected later, in another test's event loop
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("kind", ["base", "adapter"])
def test_one_flipped_bit_anywhere_restores_exactly_or_is_called_damaged(saved, tmp_path, kind):
    if kind == "base":
        params = {"w": jnp.arange(48.0).reshape(8, 6), "layers": [{"k": jnp.ones((6, 4))}], "b": jnp.ones(4)}
        good = tmp_path / "good"
        checkpoint.save_params(good, params)
        read, same = checkpoint.restore_params, lambda x: jax.tree.all(jax.tree.map(jnp.array_equal, x, params))
    else:
        good, lora = saved, checkpoint.restore(saved)
        read = checkpoint.restore
        same = lambda x: all(jnp.array_equal(getattr(x["w"], n), getattr(lora["w"], n)) for n in "ab")
    files = sorted(str(p.relative_to(good)) for p in good.rglob("*") if p.is_file())
    damaged = 0
    for i, name in enumerate(files):
        copy = tmp_path / f"copy{i}"
        shutil.copytree(good, copy)
        data = bytearray((copy / name).read_bytes())
        data[len(data) // 2] ^= 4
        (copy / name).write_bytes(bytes(data))
        try:
            restored = read(copy)
        except ValueError as e:
            assert str(copy) in str(e) and "damaged" in str(e), (name, str(e))
            damaged += 1
        else:
            assert same(restored), name  # a file nothing reads (a commit marker, a timestamp)
    assert damaged >= 4
    gc.collect()  # what the failed reads left behind goes now, under this test's warning filter
