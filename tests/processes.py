"""Several worker processes on 127.0.0.1 (``jax.distributed``), as the multi-host tests run them."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(worker: Path, args, pythonpath, n: int = 2, timeout: float = 300) -> list[str]:
    """Run ``python -W error worker PROCESS_ID PORT *args`` ``n`` times at once (without the
    test's XLA_FLAGS/JAX_PLATFORMS, with ``pythonpath``); every process must exit 0. Returns
    each one's output; a process still running when another fails or times out is killed."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["PYTHONPATH"] = os.pathsep.join(map(str, pythonpath))
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-W", "error", str(worker), str(i), str(port), *map(str, args)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for i in range(n)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for i, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"process {i} exited with {p.returncode}:\n{log[-4000:]}"
    return logs
