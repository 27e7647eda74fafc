"""The process node: pods bound to it really run as local processes, and report back like a kubelet."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest

from finetune_devcluster.procnode import METRICS_PORT_ANNOTATION, NODE_LABEL, TAINT_KEY, ProcessNode
from tests.integration.kubeutil import wait_for

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def procnode(cluster, tmp_path_factory):
    node = ProcessNode(cluster.api_client(), name="proc-test-0", workdir=tmp_path_factory.mktemp("procnode"), taint=True).start()

    def ready():
        conditions = json.loads(cluster.kubectl("get", "node", "proc-test-0", "-o", "json").stdout)["status"]["conditions"]
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

    wait_for("process node Ready", ready, timeout=30)
    yield node
    node.stop()
    cluster.kubectl("delete", "node", "proc-test-0", check=False)


def pod(name: str, script: str, **spec) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "annotations": {"batch.kubernetes.io/job-completion-index": "1"}},
        "spec": {
            "restartPolicy": "Never",
            "nodeSelector": {NODE_LABEL: "process"},
            "tolerations": [{"key": TAINT_KEY, "operator": "Exists"}],
            "terminationGracePeriodSeconds": 10,
            "containers": [{
                "name": "main",
                "image": "ignored",
                "command": [sys.executable, "-c", textwrap.dedent(script)],
                "args": ["$(RANK_FROM_INDEX)", "/etc/cfg/job.yaml", "--master-addr=x-0.svc-a.ns.svc"],
                "env": [
                    {"name": "RANK_FROM_INDEX", "valueFrom": {"fieldRef": {"fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}},
                    {"name": "SECRET_VALUE", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
                    {"name": "FINETUNE_METRICS_PORT", "value": "9400"},
                    {"name": "TERM_LOG", "value": "/dev/termination-log"},
                ],
                "volumeMounts": [{"name": "cfg", "mountPath": "/etc/cfg", "readOnly": True}],
                "terminationMessagePath": "/dev/termination-log",
                "terminationMessagePolicy": "FallbackToLogsOnError",
            }],
            "volumes": [{"name": "cfg", "configMap": {"name": "cfg"}}],
            **spec,
        },
    }


SCRIPT = """
import os, sys, time
rank, cfg, master = sys.argv[1], sys.argv[2], sys.argv[3]
with open(os.environ["TERM_LOG"], "w") as f:
    f.write(f"rank={rank} cfg={open(cfg).read().strip()} secret={os.environ['SECRET_VALUE']} {master} port={os.environ['FINETUNE_METRICS_PORT']}")
sys.exit(int(os.environ.get("EXIT", "0")))
"""


def _setup(cluster, namespace):
    cluster.kubectl("create", "configmap", "cfg", "-n", namespace, "--from-literal=job.yaml=hello-config")
    cluster.kubectl("create", "secret", "generic", "creds", "-n", namespace, "--from-literal=token=s3cr3t")


def _terminated(cluster, namespace, name, phase):
    def done():
        p = json.loads(cluster.kubectl("get", "pod", name, "-n", namespace, "-o", "json").stdout)
        return p if p["status"].get("phase") == phase else None

    p = wait_for(f"pod {name} {phase}", done, timeout=60)
    return p, p["status"]["containerStatuses"][0]["state"]["terminated"]


def test_pod_runs_as_a_process_with_env_volumes_and_termination_message(cluster, procnode, namespace):
    _setup(cluster, namespace)
    cluster.kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(pod("ok", SCRIPT)))
    p, term = _terminated(cluster, namespace, "ok", "Succeeded")
    assert term["exitCode"] == 0 and term["reason"] == "Completed"
    msg = term["message"]
    assert "rank=1" in msg and "cfg=hello-config" in msg and "secret=s3cr3t" in msg
    assert "--master-addr=127.0.0.1" in msg  # cluster DNS names resolve to this machine
    port = p["metadata"]["annotations"][METRICS_PORT_ANNOTATION]
    assert f"port={port}" in msg and port != "9400"  # each pod gets its own metrics port
    assert p["spec"]["nodeName"] == "proc-test-0" and p["status"]["podIP"] == "127.0.0.1"


def test_failing_pod_reports_exit_code_and_message(cluster, procnode, namespace):
    _setup(cluster, namespace)
    manifest = pod("bad", SCRIPT)
    manifest["spec"]["containers"][0]["env"].append({"name": "EXIT", "value": "13"})
    cluster.kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(manifest))
    _, term = _terminated(cluster, namespace, "bad", "Failed")
    assert term["exitCode"] == 13 and term["reason"] == "Error" and "rank=1" in term["message"]


def test_deleting_a_pod_sends_sigterm_and_waits(cluster, procnode, namespace, tmp_path):
    _setup(cluster, namespace)
    marker = tmp_path / "got-sigterm"
    script = f"""
    import signal, sys, time, pathlib
    def bye(*_):
        pathlib.Path({str(marker)!r}).write_text("checkpointed")
        sys.exit(143)
    signal.signal(signal.SIGTERM, bye)
    time.sleep(600)
    """
    cluster.kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(pod("sleeper", script)))
    wait_for("running", lambda: json.loads(cluster.kubectl("get", "pod", "sleeper", "-n", namespace, "-o", "json").stdout)["status"].get("phase") == "Running")
    cluster.kubectl("delete", "pod", "sleeper", "-n", namespace, "--wait=true", timeout=60)
    assert marker.read_text() == "checkpointed"
