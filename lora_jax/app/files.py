"""The files a job writes: JSON written atomically, an output replaced, a directory's size."""

from __future__ import annotations

import json
import os
import shutil

__all__ = ["write_json", "remove", "disk_bytes"]


def write_json(path: str, data) -> None:
    """Write ``data`` as JSON atomically (a file of this process's own, then renamed).

    >>> import tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "x.json")
    >>> write_json(path, {"step": 3})
    >>> with open(path) as f:
    ...     f.read()
    '{\\n "step": 3\\n}'
    >>> os.listdir(os.path.dirname(path))  # no temporary file left
    ['x.json']
    """
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def remove(path: str) -> None:
    """Remove ``path`` (a file or directory) if it exists, so that it can be written anew.

    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> os.makedirs(os.path.join(d, "adapter", "sub"))
    >>> remove(os.path.join(d, "adapter")); remove(os.path.join(d, "missing"))
    >>> os.listdir(d)
    []
    """
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.remove(path)


def disk_bytes(path: str) -> int:
    """Total size in bytes of the files under the directory ``path``.

    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> write_json(os.path.join(d, "a.json"), [1, 2])
    >>> disk_bytes(d)
    10
    """
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)
