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
import numpy as np
import pytest

import lora_jax as lj
from lora_jax import checkpoint, peft
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


# ---------------------------------------------------------------------------------------
# PEFT adapters: every field type-checked, PEFT's semantics, files named

PEFT_MAP = [(r"(\w+)/kernel", r"attn.\1_proj")]
PEFT_PARAMS = {"q": {"kernel": jnp.ones((8, 6))}, "v": {"kernel": jnp.ones((8, 6))}}


@pytest.fixture(scope="module")
def peft_dir(tmp_path_factory):
    _, lora = lj.split(jax.random.key(0), PEFT_PARAMS, lj.LoraConfig(rules=(lj.Rule("q/kernel|v/kernel", rank=2, alpha=4.0),)))
    d = tmp_path_factory.mktemp("peft") / "adapter"
    peft.save(d, lora, PEFT_MAP)
    return d


def _peft_copy(peft_dir, tmp_path, **changes):
    d = tmp_path / "adapter"
    shutil.copytree(peft_dir, d)
    config = json.loads((d / peft.CONFIG_NAME).read_text())
    for k, v in changes.items():
        if v is _DEL:
            config.pop(k)
        else:
            config[k] = v
    (d / peft.CONFIG_NAME).write_text(json.dumps(config))
    return d


@pytest.mark.parametrize("key, value, words", [
    ("r", "2", ["r is '2'", "an int >= 1"]),
    ("r", 0, ["r is 0"]),
    ("r", True, ["r is True"]),
    ("lora_alpha", "sixteen", ["lora_alpha is 'sixteen'", "a number > 0"]),
    ("lora_alpha", None, ["lora_alpha is None"]),
    ("lora_dropout", "x", ["lora_dropout is 'x'", "a rate in [0, 1)"]),
    ("lora_dropout", None, ["lora_dropout is None"]),
    ("lora_dropout", 1.5, ["lora_dropout is 1.5"]),
    ("use_rslora", "false", ["use_rslora is 'false'", "true or false"]),
    ("rank_pattern", {"attn.(q": 2}, ["rank_pattern key 'attn.(q' is not a valid regex"]),
    ("rank_pattern", [2], ["rank_pattern is [2]"]),
    ("rank_pattern", {"attn.q_proj": "2"}, ["rank_pattern['attn.q_proj'] is '2'"]),
    ("alpha_pattern", {"attn.q_proj": None}, ["alpha_pattern['attn.q_proj'] is None"]),
    ("target_modules", 5, ["target_modules is 5"]),
    ("target_modules", "attn.(", ["target_modules 'attn.(' is not a valid regex"]),
    ("exclude_modules", 5, ["exclude_modules is 5"]),
    ("peft_type", None, ["peft_type is None"]),
])
def test_peft_config_fields_are_type_checked(peft_dir, tmp_path, key, value, words):
    d = _peft_copy(peft_dir, tmp_path, **{key: value})
    with pytest.raises(ValueError) as e:
        peft.load(d, PEFT_PARAMS, PEFT_MAP)
    assert str(d / peft.CONFIG_NAME) in str(e.value)
    for w in words:
        assert w in str(e.value), str(e.value)


@pytest.mark.parametrize("text", ["{\"r\": 2, ", "nonsense", "[1, 2]", "null", "\xff\xfe"])
def test_peft_config_that_is_not_a_json_object(peft_dir, tmp_path, text):
    d = _peft_copy(peft_dir, tmp_path)
    (d / peft.CONFIG_NAME).write_bytes(text.encode("latin-1"))
    with pytest.raises(ValueError, match="not valid JSON|expected an object") as e:
        peft.load(d, PEFT_PARAMS, PEFT_MAP)
    assert str(d / peft.CONFIG_NAME) in str(e.value)


def _lying_header(data: bytes) -> bytes:
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    key = next(k for k in header if k != "__metadata__")
    header[key]["data_offsets"][1] += 10_000  # past the end of the file
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + data[8 + n :]


@pytest.mark.parametrize("damage", [
    lambda data: data[: len(data) // 2],
    lambda data: data[:5],
    lambda data: (2**40).to_bytes(8, "little") + data[8:],
    _lying_header,
    lambda data: b"garbage" * 10,
], ids=["truncated", "shorter than its header size", "header size past the end", "offsets past the end", "garbage"])
def test_peft_weights_that_are_damaged(peft_dir, tmp_path, damage):
    d = _peft_copy(peft_dir, tmp_path)
    f = d / peft.WEIGHTS_NAME
    f.write_bytes(damage(f.read_bytes()))
    with pytest.raises(ValueError, match="not a readable safetensors file") as e:
        peft.load(d, PEFT_PARAMS, PEFT_MAP)
    assert str(f) in str(e.value)


def test_peft_target_modules_semantics(peft_dir, tmp_path):
    # what target_modules does not list is dropped, as PEFT drops it
    d = _peft_copy(peft_dir, tmp_path, target_modules=["q_proj"])
    with pytest.warns(UserWarning, match=r"factors for attn\.v_proj, which target_modules does not list"):
        lora = peft.load(d, PEFT_PARAMS, PEFT_MAP)
    assert lora["q"]["kernel"] is not None and lora["v"]["kernel"] is None
    shutil.rmtree(d)
    d = _peft_copy(peft_dir, tmp_path, target_modules="attn\\.v_proj")  # a string is a regex
    with pytest.warns(UserWarning, match=r"attn\.q_proj"):
        assert peft.load(d, PEFT_PARAMS, PEFT_MAP)["q"]["kernel"] is None
    shutil.rmtree(d)
    # a listed module without tensors is loaded as nothing, with a warning naming it
    d = _peft_copy(peft_dir, tmp_path, target_modules=["attn.q_proj", "attn.v_proj", "k_proj"])
    with pytest.warns(UserWarning, match=r"target_modules lists \['k_proj'\]"):
        lora = peft.load(d, PEFT_PARAMS, PEFT_MAP)
    assert lora["q"]["kernel"] is not None and lora["v"]["kernel"] is not None
    shutil.rmtree(d)
    # use_rslora false is alpha / r; r given as the tensors' rank
    d = _peft_copy(peft_dir, tmp_path, use_rslora=False, r=2)
    w = peft.load(d, PEFT_PARAMS, PEFT_MAP)["q"]["kernel"]
    assert w.scaling == "lora" and w.scale == 2.0


@pytest.mark.parametrize("template, words", [
    ("a{", ["'a{'", "not valid", "'{{'"]),
    ("attn.{x}", ["{x}", "bare '{}'"]),
    (r"attn.\3", ["attn.\\\\3", "not valid"]),
])
def test_peft_save_with_a_bad_name_template(tmp_path, template, words):
    _, lora = lj.split(jax.random.key(0), PEFT_PARAMS, lj.LoraConfig(rules=(lj.Rule("q/kernel", rank=2),)))
    with pytest.raises(ValueError) as e:
        peft.save(tmp_path / "out", lora, [(r"(\w+)/kernel", template)])
    assert "'q/kernel'" in str(e.value)
    for w in words:
        assert w in str(e.value), str(e.value)


# ---------------------------------------------------------------------------------------
# outputs inside inputs


def test_an_output_inside_an_input_checkpoint_is_refused(saved, tmp_path, capsys):
    base = tmp_path / "base"
    checkpoint.save_params(base, {"w": jnp.ones((8, 6)), "layers": [{"k": jnp.ones((6, 4))}], "b": jnp.ones(4)})
    adapter = tmp_path / "adapter"
    shutil.copytree(saved, adapter)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    for out, name in ((adapter / "merged", "adapter"), (base / "x" / "y", "base"), (base, "base")):
        with pytest.raises(ValueError, match=f"inside the {name} checkpoint|is the {name} checkpoint"):
            checkpoint.merge(base, adapter, out)
    os.symlink(adapter, tmp_path / "link")
    _cli_error(capsys, ["merge", str(base), str(adapter), str(tmp_path / "link" / "m")], "inside the adapter checkpoint")
    _cli_error(capsys, ["export-peft", str(adapter), str(adapter)], "is the adapter checkpoint")
    _cli_error(capsys, ["export-peft", str(adapter), str(tmp_path / "link" / "peft")], "inside the adapter checkpoint")
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before + [str(tmp_path / "link")]
    assert checkpoint.restore(adapter)["w"].scale == 2.0


# ---------------------------------------------------------------------------------------
# a full disk


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax's failed writes, collected
def test_a_full_disk_is_one_line(saved, tmp_path, capfd, monkeypatch):
    import errno

    from orbax.checkpoint._src.path import async_path

    base = tmp_path / "base"
    checkpoint.save_params(base, {"w": jnp.ones((8, 6)), "layers": [{"k": jnp.ones((6, 4))}], "b": jnp.ones(4)})
    _, lora = lj.split(jax.random.key(0), PEFT_PARAMS, lj.LoraConfig(rules=(lj.Rule("q/kernel", rank=2),)))
    checkpoint.save(tmp_path / "adapter", lora)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    async def full_async(*args, **kwargs):
        full()

    monkeypatch.setattr(async_path, "write_text", full_async)  # what orbax's writer threads call
    monkeypatch.setattr(peft, "save_file", full)
    # capfd: also what orbax's threads log straight to the process's stderr
    _cli_error(capfd, ["merge", str(base), str(saved), str(tmp_path / "out")],
               "no space left on the device", tmp_path / "out")
    _cli_error(capfd, ["export-peft", str(tmp_path / "adapter"), str(tmp_path / "peft")],
               "no space left on the device", tmp_path / "peft")
    gc.collect()


# ---------------------------------------------------------------------------------------
# library arguments


@pytest.mark.parametrize("dtype", ["int8", "bogus", jnp.int32, "bool", object()])
def test_lora_config_dtype_must_be_a_float_dtype(dtype):
    with pytest.raises(ValueError, match=r"LoraConfig dtype=.*floating-point dtype"):
        lj.LoraConfig(rules=(lj.Rule("w"),), dtype=dtype)
    assert lj.LoraConfig(rules=(lj.Rule("w"),), dtype="bfloat16").dtype == "bfloat16"


def test_merge_with_a_parameter_tree_as_lora_is_a_type_error():
    params = {"w": jnp.ones((4, 4)), "b": jnp.ones(4)}
    for fn in (lj.merge, lj.unmerge):
        with pytest.raises(TypeError, match=rf"{fn.__name__}: the second argument must be a lora tree from lj.split.* at b, w"):
            fn(params, params)


def test_a_damaged_cache_entry_is_named(tmp_path):
    from lora_jax.app.data import load_corpus
    from lora_jax.app.model import _cache_key, pretrained
    from lora_jax.app.run_config import ModelConfig, PretrainConfig

    m, p = ModelConfig(d_model=8, n_layers=1, n_heads=1, d_ff=8, context=8), PretrainConfig(steps=2, batch_size=2)
    corpus = load_corpus("pydoc", max_bytes=20_000, context=8)
    entry = tmp_path / "pretrained" / f"tinylm-{_cache_key(m, p, corpus.train)}"
    (entry / "params").mkdir(parents=True)
    for text in ('{"losses": [1', "[]"):
        (entry / "info.json").write_text(text)
        with pytest.raises(ValueError, match="cache entry .*info.json is damaged.*delete it") as e:
            pretrained(m, p, corpus, cache_dir=str(tmp_path), progress=False, log=None)
        assert str(entry / "info.json") in str(e.value)


def test_nnx_call_on_a_module_with_a_plain_dataclass_config():
    import dataclasses

    from flax import nnx

    @dataclasses.dataclass  # not frozen: unhashable, as google-tunix's Gemma3 and Qwen3 configs
    class Config:
        d: int = 8

    class Model(nnx.Module):
        def __init__(self, config, rngs):
            self.config = config
            self.lin = nnx.Linear(config.d, 4, rngs=rngs)

        def __call__(self, x):
            return self.lin(x)

    graphdef, base, lora = lj.nnx.split(Model(Config(), nnx.Rngs(0)), lj.LoraConfig(rules=(lj.Rule("lin/kernel", rank=2),)),
                                        jax.random.key(1))
    with pytest.raises(TypeError):
        hash(graphdef)
    x = jnp.ones((2, 8))
    lora = jax.tree.map(lambda w: w.replace(b=jnp.ones_like(w.b)) if isinstance(w, lj.LoraWeight) else w, lora,
                        is_leaf=lambda w: isinstance(w, lj.LoraWeight))
    y = lj.nnx.call(graphdef, base, lora, x)
    merged = lj.nnx.merge(graphdef, base, lora)
    np.testing.assert_allclose(y, merged(x), rtol=1e-5, atol=1e-5)
    from lora_jax import nnx as lj_nnx

    assert lj_nnx._wrapped(graphdef, "factored") is lj_nnx._wrapped(graphdef, "factored")  # traces are reused
