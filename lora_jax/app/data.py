"""Text corpora that need no download, as byte streams with a held-out split.

- ``pydoc``: the documentation topics every CPython ships in ``pydoc_data.topics``
  (the text ``help("if")`` prints): English prose with code examples.
- ``stdlib``: the source code of the Python standard library (``.py`` files, tests and
  demos left out), a different domain of the same interpreter.
- ``files``: the user's own text files (paths or glob patterns).

Documents are split into train and held-out by a hash of their name, so the split does
not depend on which other documents exist; a corpus with too few documents for that is
split by position instead. Text is UTF-8 bytes (a 256-symbol vocabulary, no tokenizer).
"""

from __future__ import annotations

import dataclasses
import glob
import os
import random
import sysconfig
import zlib

import numpy as np

__all__ = ["Corpus", "load_corpus"]

# stdlib directories that are not library code (tests, demos, bundled wheels)
_SKIP_DIRS = {"test", "tests", "idle_test", "idlelib", "turtledemo", "site-packages", "dist-packages",
              "ensurepip", "__pycache__", "lib2to3", "tkinter", "pydoc_data"}


@dataclasses.dataclass(frozen=True)
class Corpus:
    """A corpus as two byte streams (``uint8``), documents joined by blank lines.

    >>> c = Corpus("demo", np.frombuffer(b"abcdefghij" * 10, np.uint8), np.frombuffer(b"0123456789" * 3, np.uint8), 2)
    >>> c.batch(step=0, batch_size=2, context=8, seed=0).shape
    (2, 9)
    >>> bytes(c.eval_windows(2, context=8)[0].astype(np.uint8))
    b'012345678'
    """

    name: str
    train: np.ndarray
    heldout: np.ndarray
    documents: int

    def batch(self, step: int, batch_size: int, context: int, seed: int = 0) -> np.ndarray:
        """``(batch_size, context + 1)`` int32 windows of the train stream, a function of (seed, step) only."""
        rng = np.random.default_rng((seed, step))
        starts = rng.integers(0, len(self.train) - context - 1, size=batch_size)
        return _windows(self.train, starts, context)

    def eval_windows(self, n: int, context: int) -> np.ndarray:
        """``(n, context + 1)`` int32 windows spread evenly over the held-out stream."""
        starts = np.linspace(0, len(self.heldout) - context - 1, n).astype(np.int64)
        return _windows(self.heldout, starts, context)


def _windows(stream: np.ndarray, starts: np.ndarray, context: int) -> np.ndarray:
    idx = starts[:, None] + np.arange(context + 1)[None, :]
    return stream[idx].astype(np.int32)


def _pydoc_documents() -> list[tuple[str, str]]:
    from pydoc_data.topics import topics

    return sorted(topics.items())


def _stdlib_documents(max_bytes: int) -> list[tuple[str, str]]:
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        files += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py")]
    files = sorted(os.path.relpath(f, root) for f in files)
    random.Random(0).shuffle(files)  # a spread of modules, the same one on every run
    docs, total = [], 0
    for rel in files:
        try:
            with open(os.path.join(root, rel), encoding="utf-8") as f:
                text = f.read()
        except (UnicodeDecodeError, OSError):
            continue
        docs.append((rel, text))
        total += len(text)
        if total >= max_bytes:
            break
    if not docs:
        raise ValueError(f"data.corpus=stdlib: no readable .py files under {root}")
    return docs


def _file_documents(patterns) -> list[tuple[str, str]]:
    files = []
    for pattern in patterns:
        found = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p))
        if not found:
            raise ValueError(f"data.paths: {pattern!r} matches no file; give existing files or glob patterns")
        files += found
    docs = []
    for path in dict.fromkeys(files):
        with open(path, "rb") as f:
            docs.append((path, f.read().decode("utf-8", errors="replace")))
    return docs


def load_corpus(name: str, *, paths=(), max_bytes: int = 2_000_000, heldout: float = 0.1, context: int = 128) -> Corpus:
    """Load corpus ``name`` (``pydoc``, ``stdlib`` or ``files``) split into train and held-out bytes.

    At most ``max_bytes`` bytes are used. Each stream must hold more than ``context + 1``
    bytes, else a ``ValueError`` says how much text is needed.

    >>> c = load_corpus("pydoc", max_bytes=200_000)
    >>> c.documents > 10, len(c.train) > len(c.heldout) > 1000
    (True, True)
    """
    if name == "pydoc":
        docs = _pydoc_documents()
    elif name == "stdlib":
        docs = _stdlib_documents(max_bytes)
    elif name == "files":
        docs = _file_documents(paths)
    else:
        raise ValueError(f"unknown corpus {name!r}; expected one of pydoc, stdlib, files")
    encoded = [(key, text.encode("utf-8") + b"\n\n") for key, text in docs]
    train, held, total = [], [], 0
    for key, data in encoded:
        data = data[: max(0, max_bytes - total)]
        if not data:
            break
        total += len(data)
        bucket = held if zlib.crc32(key.encode()) % 10_000 < heldout * 10_000 else train
        bucket.append(data)
    if sum(map(len, held)) <= context + 1 or sum(map(len, train)) <= context + 1:
        stream = b"".join(train + held)  # too few documents: split by position
        cut = int(len(stream) * (1 - heldout))
        train, held = [stream[:cut]], [stream[cut:]]
    as_array = lambda parts: np.frombuffer(b"".join(parts), dtype=np.uint8)
    corpus = Corpus(name, as_array(train), as_array(held), len(encoded))
    for part, stream in (("train", corpus.train), ("held-out", corpus.heldout)):
        if len(stream) <= context + 1:
            raise ValueError(
                f"corpus {name}: the {part} split has {len(stream)} bytes, fewer than model.context + 2 = "
                f"{context + 2}; give more text (data.paths, data.max_bytes) or a smaller model.context"
            )
    return corpus
