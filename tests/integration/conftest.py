"""Fixtures for tests that run the real operator against the local control plane."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from finetune_devcluster.procutil import free_port
from tests.integration.kubeutil import Kubectl, wait_for

ROOT = Path(__file__).resolve().parents[2]
CRD = ROOT / "crds" / "finetune.io_finetunejobs.yaml"
SWEEP_CRD = ROOT / "crds" / "finetune.io_finetunesweeps.yaml"


@pytest.fixture(scope="session")
def kubectl(cluster) -> Kubectl:
    return Kubectl(str(cluster.kubeconfig), cluster.env())


@pytest.fixture(scope="session")
def crd_installed(kubectl: Kubectl) -> None:
    kubectl.run("apply", "--server-side", "--force-conflicts", "-f", str(CRD), "-f", str(SWEEP_CRD))
    # Polled rather than `kubectl wait`: right after a create, .status.conditions is still null and
    # `kubectl wait --for=condition=...` fails at once on that instead of waiting.
    def established() -> bool:
        crd = kubectl.get("crd", "finetunejobs.finetune.io") or {}
        conditions = {c["type"]: c["status"] for c in (crd.get("status") or {}).get("conditions") or []}
        return conditions.get("Established") == "True"

    wait_for("the FineTuneJob CRD established", established, timeout=60)
    # discovery needs a moment after Established before `kubectl get ftj` resolves the short name
    wait_for("ftj short name", lambda: kubectl.run("get", "ftj", "-A", check=False).returncode == 0, timeout=30)


class OperatorProcess:
    """`python -m finetune_operator` as a subprocess: the same entry point the image runs."""

    def __init__(self, kubeconfig: str, log_dir: Path, extra_env: dict[str, str] | None = None):
        self.kubeconfig = kubeconfig
        self.extra_env = dict(extra_env or {})  # operator settings on top of the defaults below
        self.log_path = log_dir / "operator.log"
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = {
            **os.environ,
            "KUBECONFIG": self.kubeconfig,
            "FINETUNE_METRICS_PORT": str(self.port),
            "FINETUNE_RESYNC_SECONDS": "2",
            "FINETUNE_TRAINER_IMAGE": "finetune-trainer:test",
            "FINETUNE_TERMINATION_GRACE_SECONDS": "5",
            "MALLOC_ARENA_MAX": "2",  # as in operator/Dockerfile
            "FINETUNE_PROGRESS_INTERVAL": "2",
            **self.extra_env,
        }
        log = open(self.log_path, "a")
        self.proc = subprocess.Popen([sys.executable, "-m", "finetune_operator"], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        wait_for("operator /healthz", self._healthy, timeout=60)

    def _healthy(self) -> bool:
        if self.proc and self.proc.poll() is not None:
            raise RuntimeError(f"operator exited with {self.proc.returncode}:\n{self.tail()}")
        try:
            return requests.get(f"{self.url}/healthz", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    def kill(self) -> None:
        """SIGKILL: no chance to clean up, like a crashed or OOM-killed pod."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def tail(self, lines: int = 80) -> str:
        try:
            return "\n".join(self.log_path.read_text().splitlines()[-lines:])
        except FileNotFoundError:
            return "<no log>"


@pytest.fixture(scope="session")
def operator(cluster, crd_installed, tmp_path_factory) -> OperatorProcess:
    op = OperatorProcess(str(cluster.kubeconfig), tmp_path_factory.mktemp("operator"))
    op.start()
    yield op
    op.stop()


@pytest.fixture(autouse=True)
def _operator_log_on_failure(request):
    yield
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed and "operator" in request.fixturenames:
        op = request.getfixturevalue("operator")
        print(f"\n---- operator log (tail) ----\n{op.tail()}")


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)
