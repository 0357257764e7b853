"""The files a job writes: JSON written atomically and read back with its name in every
error, an output replaced, a directory's size, an output directory held by one run, and
writes that Ctrl-C does not cut in the middle."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import signal
import threading
from typing import Iterator

__all__ = ["write_json", "read_json", "remove", "disk_bytes", "human_bytes", "output_dir", "uninterrupted"]


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


def read_json(path: str, what: str = "file") -> dict:
    """The JSON object in ``path``; a ``ValueError`` naming ``path`` (and ``what`` it is) when
    the file is not valid JSON or holds something other than an object.

    >>> import tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "x.json")
    >>> write_json(path, {"step": 3})
    >>> read_json(path)
    {'step': 3}
    >>> with open(path, "w") as f:
    ...     _ = f.write('{"step": ')
    >>> read_json(path, "the loss history")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: the loss history .../x.json is damaged (not valid JSON: ...); delete it ...
    """
    try:
        with open(path) as f:
            data = json.load(f)
    except (ValueError, RecursionError, UnicodeDecodeError) as e:
        raise ValueError(f"{what} {path} is damaged (not valid JSON: {e}); delete it or restore it from a copy") from None
    if not isinstance(data, dict):
        raise ValueError(
            f"{what} {path} is damaged: it holds a JSON {type(data).__name__}, not an object; delete it "
            "or restore it from a copy"
        )
    return data


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


def human_bytes(n: float) -> str:
    """A byte count for people: B, KiB, MiB, GiB or TiB with one decimal.

    >>> human_bytes(200), human_bytes(4000), human_bytes(3 * 2**40)
    ('200 B', '3.9 KiB', '3.0 TiB')
    """
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError  # pragma: no cover


@contextlib.contextmanager
def output_dir(path: str) -> Iterator[str]:
    """Create (if needed) and hold the directory ``path`` for one job until the block ends.

    The directory itself is locked with ``fcntl.flock`` (exclusive, non-blocking): a second
    job on the same directory is refused at once with a ``BlockingIOError`` naming it, and
    the lock goes away with the process, however it ends. ``path`` must be a writable
    directory or a path where one can be created (an ``OSError`` naming it otherwise). The
    directories the block created are removed again when it fails and left nothing.

    >>> import tempfile
    >>> out = os.path.join(tempfile.mkdtemp(), "run")
    >>> with output_dir(out):
    ...     write_json(os.path.join(out, "a.json"), 1)
    ...     with output_dir(out):  # a second job on the same directory
    ...         pass
    Traceback (most recent call last):
    ...
    BlockingIOError: output.dir .../run is in use by another run (it holds the directory's lock)...
    >>> os.listdir(out)
    ['a.json']
    """
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"output.dir {path} is a file, not a directory; set output.dir to a directory path")
    top = None  # the outermost directory this call creates
    parent = path
    while not os.path.exists(parent):
        top, parent = parent, os.path.dirname(parent)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise OSError(e.errno, f"output.dir {path} cannot be created ({e.strerror}); choose a writable place") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise PermissionError(f"output.dir {path} is not writable; choose a writable directory or fix its permissions")
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            raise BlockingIOError(
                f"output.dir {path} is in use by another run (it holds the directory's lock); wait for "
                "it to finish, or --set output.dir=<new dir>"
            ) from None
        if not (os.path.isdir(path) and os.path.samestat(os.fstat(fd), os.stat(path))):
            # the run that held it removed it (it failed before writing anything)
            raise BlockingIOError(f"output.dir {path} was removed by another run as this one started; run again")
        try:
            yield path
        except BaseException:
            if top is not None and not os.listdir(path):  # still locked: nobody else has begun to use it
                os.rmdir(path)
                while path != top and not os.listdir(os.path.dirname(path)):
                    path = os.path.dirname(path)
                    os.rmdir(path)
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def uninterrupted() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) back until the block ends, then raise the ``KeyboardInterrupt``.

    For checkpoint writes: orbax writes from threads of its own, and an interrupt that
    unwinds the main thread while they run leaves them failing at interpreter shutdown.
    Outside the main thread (where handlers cannot be set) the block runs as it is.

    >>> try:
    ...     with uninterrupted():
    ...         os.kill(os.getpid(), signal.SIGINT)  # held back ...
    ...         print("the write finished")
    ... except KeyboardInterrupt:
    ...     print("then the interrupt")
    the write finished
    then the interrupt
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt
