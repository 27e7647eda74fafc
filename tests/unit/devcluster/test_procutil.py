"""finetune_devcluster.procutil: the dev cluster's one home for ports and processes.

No cluster: only sockets on 127.0.0.1 and short-lived Python children.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from finetune_devcluster import procutil


def _listener(port: int = 0, reuse_addr: bool = False) -> socket.socket:
    s = socket.socket()
    if reuse_addr:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port))
    s.listen()
    return s


def _time_wait_port() -> int:
    """A port whose only socket is in TIME_WAIT: the server side of a connection closes first."""
    server = _listener(reuse_addr=True)
    port = server.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = server.accept()
    accepted.close()  # the side that closes first keeps the 4-tuple in TIME_WAIT
    time.sleep(0.05)
    client.close()
    server.close()
    return port


def test_free_port_can_be_listened_on_without_reuse_addr() -> None:
    port = procutil.free_port()
    assert 1024 <= port <= 65535
    _listener(port).close()


def test_a_listening_port_is_not_free_either_way() -> None:
    with _listener() as held:
        port = held.getsockname()[1]
        assert procutil.port_free(port) is False
        assert procutil.port_free(port, reuse_addr=False) is False
    assert procutil.port_free(port, reuse_addr=False) is True


def test_time_wait_leftovers_block_only_the_strict_check() -> None:
    """Why there are two checks: a just-stopped server leaves TIME_WAIT sockets behind. Servers that set
    SO_REUSEADDR (MinIO, Prometheus, http.server) can bind the port again, so a preferred port stays
    usable; a process whose bind options we don't know might not, so port blocks use the strict check."""
    port = _time_wait_port()
    assert procutil.port_free(port) is True
    assert procutil.port_free(port, reuse_addr=False) is False
    _listener(port, reuse_addr=True).close()  # what the default check promised


def test_free_port_block_is_consecutive_and_free() -> None:
    base = procutil.free_port_block(4)
    socks = []
    try:
        for i in range(4):  # every port of the block can be listened on
            socks.append(_listener(base + i))
        # with the first port taken, a new block starts elsewhere
        assert procutil.free_port_block(1) != base
    finally:
        for s in socks:
            s.close()


def test_free_port_block_skips_a_block_with_a_taken_port(monkeypatch: pytest.MonkeyPatch) -> None:
    with _listener() as held:
        taken = held.getsockname()[1]
        monkeypatch.setattr(procutil, "free_port", lambda: taken - 1)  # every candidate block holds `taken`
        with pytest.raises(RuntimeError, match="no block of 2 consecutive free ports"):
            procutil.free_port_block(2, attempts=3)
        assert procutil.free_port_block(1) == taken - 1  # a block of one only needs its first port


def test_pid_alive_needs_the_marker_and_a_live_process() -> None:
    me = os.getpid()
    argv0 = Path(f"/proc/{me}/cmdline").read_bytes().split(b"\0")[0].decode()
    assert procutil.pid_alive(me, argv0)
    assert not procutil.pid_alive(me, "no-such-marker-in-the-cmdline")
    child = subprocess.Popen([sys.executable, "-c", "pass  # marker-zombie"])
    deadline = time.monotonic() + 10
    while Path(f"/proc/{child.pid}/stat").read_text().split(") ")[1][0] != "Z" and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not procutil.pid_alive(child.pid, "marker-zombie")  # exited, not yet reaped: a zombie is not alive
    child.wait()
    assert not procutil.pid_alive(child.pid, "marker-zombie")


def test_die_with_parent_ends_the_child_when_the_parent_is_killed() -> None:
    parent_code = textwrap.dedent("""
        import subprocess, sys, time
        from finetune_devcluster.procutil import die_with_parent
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)  # orphan-marker"],
                                 preexec_fn=die_with_parent)
        print(child.pid, flush=True)
        time.sleep(60)
    """)
    parent = subprocess.Popen([sys.executable, "-c", parent_code], stdout=subprocess.PIPE, text=True)
    try:
        child_pid = int(parent.stdout.readline())
        assert procutil.pid_alive(child_pid, "orphan-marker")
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 10
        while procutil.pid_alive(child_pid, "orphan-marker") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not procutil.pid_alive(child_pid, "orphan-marker")
    finally:
        parent.kill()
        parent.wait()


def test_tail_returns_the_last_lines_or_says_why_not(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    log.write_text("".join(f"line {i}\n" for i in range(10)))
    assert procutil.tail(log, 3) == "line 7\nline 8\nline 9"
    assert procutil.tail(tmp_path / "missing.log").startswith("<no log: ")


class _WaitError(RuntimeError):
    pass


def test_wait_http_ready_returns_once_the_server_answers_200(tmp_path: Path) -> None:
    import http.server
    import threading

    from finetune_devcluster.procutil import free_port, wait_http_ready

    port = free_port()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), http.server.SimpleHTTPRequestHandler)
    threading.Timer(0.5, lambda: threading.Thread(target=server.serve_forever, daemon=True).start()).start()  # answers only later
    try:
        wait_http_ready(f"http://127.0.0.1:{port}/", proc=None, timeout=10, what="web", log=tmp_path / "none.log", error=_WaitError)
    finally:
        server.shutdown()
        server.server_close()


def test_wait_http_ready_fails_at_once_when_the_process_exits_and_on_timeout(tmp_path: Path) -> None:
    from finetune_devcluster.procutil import free_port, wait_http_ready

    log = tmp_path / "srv.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", "print('cannot bind'); raise SystemExit(3)"], stdout=out)
    t0 = time.monotonic()
    with pytest.raises(_WaitError, match=r"(?s)srv exited with 3:.*cannot bind"):
        wait_http_ready(f"http://127.0.0.1:{free_port()}/", proc=proc, timeout=30, what="srv", log=log, error=_WaitError)
    assert time.monotonic() - t0 < 10  # not the whole timeout
    with pytest.raises(_WaitError, match=r"srv not ready at http://127.0.0.1:\d+/ after 0.5s \(last: "):
        wait_http_ready(f"http://127.0.0.1:{free_port()}/", proc=None, timeout=0.5, what="srv", log=log, error=_WaitError)
