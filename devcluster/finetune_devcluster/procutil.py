"""Ports and processes on this machine: the one place the dev cluster (and the tests) pick loopback
ports, tie children to the parent's life, recognise their own pids, read a log's tail and wait for a
server to answer.

Everything here listens on 127.0.0.1 only. A port picked by ``free_port`` is free when picked, not
reserved: whoever binds it later can still lose a race, which is why ``LocalCluster.start`` and
``LocalS3.start`` retry on "address already in use".
"""

from __future__ import annotations

import ctypes
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing is bound to now (the kernel's pick for port 0).

    The kernel never hands out a port that any socket holds, TIME_WAIT leftovers included, so the
    port suits any server, whatever its bind options."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def port_free(port: int, *, reuse_addr: bool = True, host: str = LOOPBACK) -> bool:
    """Whether a server could listen on ``port`` at ``host`` (127.0.0.1 by default) now.

    ``reuse_addr=True`` (the default) asks it the way the servers we start bind: MinIO, Prometheus,
    the operator's and the trainer's metrics servers (``http.server``) all set SO_REUSEADDR, so
    sockets of a just-stopped server still in TIME_WAIT don't block them, and must not make us give
    up a preferred port (S3 on 9000, Prometheus on 9090, operator metrics on 8080) after a restart.

    ``reuse_addr=False`` is the strict check: no socket at all holds the port. ``free_port_block``
    uses it, because it hands ports to a pod's processes, whose bind options are not ours to know."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        if reuse_addr:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def free_port_block(count: int, attempts: int = 100) -> int:
    """The first of ``count`` consecutive ports free on this machine (a pod's ranks serve base + i)."""
    count = max(count, 1)
    for _ in range(attempts):
        base = free_port()
        if base + count - 1 <= 65535 and all(port_free(base + i, reuse_addr=False) for i in range(1, count)):
            return base
    raise RuntimeError(f"no block of {count} consecutive free ports found")


def die_with_parent() -> None:  # pragma: no cover - runs in the child
    """``preexec_fn`` for Popen: the kernel SIGTERMs the child when the parent dies, so a pytest
    killed with -9 leaves no stray control plane behind. A no-op where prctl is missing."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def pid_alive(pid: int, marker: str) -> bool:
    """pid is running (not a zombie) and its command line mentions ``marker``, so a recycled pid
    that now belongs to some other program is never taken for ours."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return marker in cmd and ") Z" not in stat


def tail(path: Path, lines: int = 50) -> str:
    """The last ``lines`` lines of a log file, or a note saying why there is none (for error messages)."""
    try:
        data = path.read_text(errors="replace").splitlines()
    except OSError as e:
        return f"<no log: {e}>"
    return "\n".join(data[-lines:])


def wait_http_ready(url: str, *, proc: subprocess.Popen | None, timeout: float, what: str, log: Path,
                    error: type[Exception], interval: float = 0.25) -> None:
    """Poll ``GET url`` until it answers 200. Raise ``error`` (with the tail of ``log``) as soon as
    ``proc`` exits, or once ``timeout`` seconds have passed."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise error(f"{what} exited with {proc.returncode}:\n{tail(log, 60)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError as e:  # URLError and HTTPError are OSErrors
            last = e
        time.sleep(interval)
    raise error(f"{what} not ready at {url} after {timeout}s (last: {last!r}):\n{tail(log, 60)}")
