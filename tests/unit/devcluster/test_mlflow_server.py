"""The demo's MLflow server (``make demo`` / ``up`` start it through stack.start_mlflow): it serves the
tracking API on its port, stores artifacts in the local S3, and ``down`` stops it with its workers."""

from __future__ import annotations

import json
import os
import time
import urllib.request

import pytest

from finetune_devcluster import stack

pytestmark = pytest.mark.slow


def test_start_mlflow_serves_and_stops_with_its_workers(tmp_path, s3):
    pid, port = stack.start_mlflow(tmp_path, s3)
    try:
        assert (tmp_path / "mlflow.port").read_text().strip() == str(port)
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    assert r.read() == b"OK"
                    break
            except OSError:
                assert time.monotonic() < deadline, (tmp_path / "mlflow.log").read_text()[-2000:]
                time.sleep(0.5)
        req = urllib.request.Request(f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/create", method="POST",
                                     data=json.dumps({"name": "demo"}).encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            experiment_id = json.loads(r.read())["experiment_id"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/get?experiment_id={experiment_id}", timeout=10) as r:
            assert json.loads(r.read())["experiment"]["artifact_location"] == f"mlflow-artifacts:/{experiment_id}"
        assert stack.start_mlflow(tmp_path, s3) == (pid, port)  # a second `up` finds it running
    finally:
        assert stack.stop(tmp_path, "mlflow")
    deadline = time.monotonic() + 10
    while _live_members(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _live_members(pid) == []  # the whole process group (server and its workers) is gone


def _live_members(pgid: int) -> list[int]:
    """Processes of group ``pgid`` that are not zombies (the server is this test's child until reaped)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()  # state, ppid, pgrp, ...
            if int(fields[2]) == pgid and fields[0] != "Z":
                out.append(int(entry))
    return out
