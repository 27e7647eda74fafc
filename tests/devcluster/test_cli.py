"""``python -m finetune_devcluster up|status|env|down``: background cluster + S3 that outlive the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import boto3
import pytest
from botocore.config import Config

pytestmark = [pytest.mark.cluster, pytest.mark.s3, pytest.mark.slow, pytest.mark.timeout(240)]


def cli(state: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "FINETUNE_STATE": str(state)}
    proc = subprocess.run(
        [sys.executable, "-m", "finetune_devcluster", *args], env=env, capture_output=True, text=True, timeout=200
    )
    if check:
        assert proc.returncode == 0, f"{args}: rc={proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def exports(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        if line.startswith("export ") and "=" in line:
            k, _, v = line[len("export "):].partition("=")
            out[k] = v.strip("'")
    return out


def alive(pid: int) -> bool:
    try:
        return "Z" not in Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0]
    except OSError:
        return False


def test_up_is_idempotent_and_down_stops_everything(tmp_path):
    state = tmp_path / "state"
    try:
        _up_to_down(state)
    finally:  # never leak a background stack when an assertion fails
        cli(state, "down", check=False)


def _up_to_down(state: Path) -> None:
    up = cli(state, "up", "--nodes", "1", "--bucket", "models")
    assert "cluster up" in up.stderr and "s3 up" in up.stderr
    assert "process node up" in up.stderr and "operator installed with helm" in up.stderr and "prometheus up" in up.stderr
    env = exports(up.stdout)
    assert env["KUBECONFIG"] == str(state / "cluster" / "kubeconfig")
    pids = json.loads((state / "cluster" / "cluster.json").read_text())["pids"]
    pids["s3"] = json.loads((state / "s3" / "s3.json").read_text())["pid"]
    assert set(pids) == {"etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok", "s3"}
    for name in ("operator", "procnode", "prometheus"):  # background processes of the stack
        pids[name] = int((state / f"{name}.pid").read_text())
    assert all(alive(p) for p in pids.values())

    again = cli(state, "up")
    assert "cluster already running" in again.stderr and "s3 already running" in again.stderr
    assert exports(again.stdout) == env

    st = cli(state, "status")
    assert "node kwok-node-0" in st.stdout and "Ready=True gpus=8" in st.stdout
    assert cli(state, "env").stdout.strip().splitlines() == [line for line in up.stdout.splitlines() if line.startswith("export ")]

    kenv = {**os.environ, "KUBECONFIG": env["KUBECONFIG"]}
    nodes = subprocess.run(
        [str(Path(env["PATH"].split(":")[0]) / "kubectl"), "get", "nodes", "-o", "name"],
        env=kenv, capture_output=True, text=True, timeout=60, check=True,
    ).stdout.split()
    assert nodes == ["node/kwok-node-0", "node/process-node-0"]
    s3 = boto3.client(
        "s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name=env["AWS_DEFAULT_REGION"],
        config=Config(s3={"addressing_style": "path"}),
    )
    assert [b["Name"] for b in s3.list_buckets()["Buckets"]] == ["models"]

    down = cli(state, "down")
    assert "cluster stopped" in down.stdout and "s3 stopped" in down.stdout
    assert "operator stopped" in down.stdout and "procnode stopped" in down.stdout and "prometheus stopped" in down.stdout
    assert not any(alive(p) for p in pids.values())
    assert cli(state, "status", check=False).returncode == 1
    assert not (state / "cluster").exists() and not (state / "s3").exists()
