"""The process node gives a pod one metrics port per local rank and lists them all for Prometheus.

The trainer's local rank i serves on FINETUNE_METRICS_PORT + i, so a pod that runs torchrun with
``--nproc-per-node=N`` needs N consecutive free ports and N targets in the file_sd file. No cluster
here: the node's API client is a stub, the pod is a small script that listens like N ranks would.
"""

from __future__ import annotations

import json
import sys
import textwrap
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from finetune_devcluster import procnode


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["torchrun", "--nnodes=2", "--nproc-per-node=4", "-m", "x"], 4),
        (["torchrun", "--nproc_per_node", "8", "-m", "x"], 8),
        (["torchrun", "--nproc-per-node", "2"], 2),
        (["torchrun", "--nproc-per-node=gpu", "-m", "x"], 1),
        (["torchrun", "--nproc-per-node=0"], 1),
        (["torchrun", "--nproc-per-node"], 1),
        (["python", "-m", "finetune_trainer"], 1),
        ([], 1),
    ],
)
def test_local_processes_reads_torchruns_nproc_per_node(argv: list[str], expected: int) -> None:
    assert procnode.local_processes(argv) == expected


class _StubCore:
    """The few CoreV1Api calls _launch/_wait make for a pod without volumes or secret references."""

    def __init__(self) -> None:
        self.annotations: dict[str, str] = {}
        self.statuses: list[dict[str, Any]] = []

    def patch_namespaced_pod(self, name: str, namespace: str, body: dict[str, Any]) -> None:
        self.annotations.update(body["metadata"]["annotations"])

    def patch_namespaced_pod_status(self, name: str, namespace: str, body: dict[str, Any]) -> None:
        self.statuses.append(body["status"])


# Listens like the trainer's local ranks would (rank i on FINETUNE_METRICS_PORT + i), then waits for SIGTERM.
RANKS_SCRIPT = textwrap.dedent("""
    import http.server, os, signal, sys, threading
    nproc = int(sys.argv[1].split("=")[1])
    base = int(os.environ["FINETUNE_METRICS_PORT"])
    for rank in range(nproc):
        class H(http.server.BaseHTTPRequestHandler):
            body = f"finetune_up{{local_rank=\\"{rank}\\"}} 1\\n".encode()
            def do_GET(self):
                self.send_response(200)
                self.end_headers()
                self.wfile.write(self.body)
            def log_message(self, *a):
                pass
        server = http.server.ThreadingHTTPServer(("127.0.0.1", base + rank), H)
        threading.Thread(target=server.serve_forever, daemon=True).start()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    print("listening", flush=True)
    done.wait(60)
""")


def _pod(name: str, nproc: int) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "team-a", "uid": f"uid-{name}-0000", "labels": {}},
        "spec": {
            "containers": [{
                "name": "trainer",
                "command": [sys.executable, "-c", RANKS_SCRIPT, f"--nproc-per-node={nproc}"],
                "env": [{"name": "FINETUNE_METRICS_PORT", "value": "9400"}],
            }],
        },
    }


def _until(check, what: str, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


@pytest.mark.parametrize("nproc", [1, 3])
def test_every_local_rank_is_a_prometheus_target(tmp_path: Path, nproc: int) -> None:
    from kubernetes import client

    targets_file = tmp_path / "targets.json"
    node = procnode.ProcessNode(client.ApiClient(), name="unit-proc", workdir=tmp_path / "work", targets_file=targets_file)
    node.core = _StubCore()
    node._launch(_pod("ft-0-abc", nproc))
    uid = "uid-ft-0-abc-0000"
    run = node._running[uid]
    try:
        base = int(node.core.annotations[procnode.METRICS_PORT_ANNOTATION])
        (group,) = json.loads(targets_file.read_text())
        assert group == {"targets": [f"127.0.0.1:{base + i}" for i in range(nproc)], "labels": {"namespace": "team-a", "pod": "ft-0-abc"}}
        _until(lambda: "listening" in run.log_file.read_text(), "the pod's ranks to listen")
        for i, target in enumerate(group["targets"]):  # each target really is that rank's endpoint
            with urllib.request.urlopen(f"http://{target}/metrics", timeout=5) as r:
                assert r.read().decode() == f'finetune_up{{local_rank="{i}"}} 1\n'
    finally:
        node._terminate(run, grace=10)
    assert run.done.wait(10)
    assert run.proc.returncode == 0
    _until(lambda: json.loads(targets_file.read_text()) == [], "the pod's targets to go with it")
    assert node.core.statuses[-1]["phase"] == "Succeeded"


def test_a_pod_without_trainer_metrics_is_no_target(tmp_path: Path) -> None:
    from kubernetes import client

    targets_file = tmp_path / "targets.json"
    node = procnode.ProcessNode(client.ApiClient(), name="unit-proc", workdir=tmp_path / "work", targets_file=targets_file)
    node.core = _StubCore()
    pod = _pod("plain-0", 2)
    pod["spec"]["containers"][0]["command"] = [sys.executable, "-c", "pass", "--nproc-per-node=2"]
    pod["spec"]["containers"][0]["env"] = []
    node._launch(pod)
    _until(lambda: node.core.statuses and node.core.statuses[-1]["phase"] == "Succeeded", "the pod to finish")
    assert not targets_file.exists() or json.loads(targets_file.read_text()) == []
