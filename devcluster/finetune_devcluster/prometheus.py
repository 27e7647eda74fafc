"""A real Prometheus (Debian's ``prometheus`` package) scraping the operator and the trainer pods.

Trainer pods are found through a file-based service discovery file that the process node keeps
current (one target per running training pod, on the port it gave that pod, with namespace/pod
labels): Debian's Prometheus build has no Kubernetes service discovery. In a real cluster the
chart's PodMonitor does this job. ``honor_labels`` keeps the trainer's own ``job`` label (the
FineTuneJob name).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from .procutil import free_port, wait_http_ready


class PrometheusError(RuntimeError):
    pass


def binary() -> str:
    exe = shutil.which("prometheus")
    if not exe:
        raise PrometheusError("prometheus is not installed: `apt-get install prometheus` (Debian) puts it on PATH")
    return exe


def config(targets_file: str | None, operator_targets: list[str], interval: str = "1s",
           operator_targets_file: str | None = None) -> dict[str, Any]:
    """Scrape the operator at ``operator_targets`` (static) or, ``operator_targets_file``, where that
    file_sd file says (its pod on a real node), and the trainer pods the ``targets_file`` lists."""
    operator: dict[str, Any] = {"job_name": "finetune-operator"}
    if operator_targets_file:
        operator["file_sd_configs"] = [{"files": [operator_targets_file], "refresh_interval": "1s"}]
    else:
        operator["static_configs"] = [{"targets": operator_targets}]
    jobs: list[dict[str, Any]] = [operator]
    if targets_file:
        jobs.append({
            "job_name": "finetune-trainer",
            "honor_labels": True,
            "file_sd_configs": [{"files": [targets_file], "refresh_interval": "1s"}],
        })
    return {"global": {"scrape_interval": interval, "evaluation_interval": interval}, "scrape_configs": jobs}


class LocalPrometheus:
    def __init__(self, targets_file: str | None, operator_targets: list[str], workdir: str | Path | None = None):
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="finetune-prometheus-"))
        self.targets_file, self.operator_targets = targets_file, operator_targets
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.workdir / "prometheus.log"

    def start(self, timeout: float = 60) -> "LocalPrometheus":
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg = self.workdir / "prometheus.yml"
        cfg.write_text(yaml.safe_dump(config(self.targets_file, self.operator_targets)))
        self.port = free_port()
        self.proc = subprocess.Popen(
            [binary(), f"--config.file={cfg}", f"--storage.tsdb.path={self.workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1d"],
            stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        wait_http_ready(f"{self.url}/-/ready", proc=self.proc, timeout=timeout, what="prometheus", log=self.log,
                        error=PrometheusError, interval=0.3)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def api(self, path: str, **params: Any) -> Any:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.loads(r.read())
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {body}")
        return body["data"]

    def query_range(self, expr: str, start: float, end: float, step: str = "2s") -> list[dict[str, Any]]:
        return self.api("query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step=step)["result"]

    def targets(self) -> list[dict[str, Any]]:
        return self.api("targets")["activeTargets"]
