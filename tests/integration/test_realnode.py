"""The real node (finetune_devcluster/realnode.py): a kubelet + containerd + runc + CNI bridge joined to
the local control plane, running a pod from the operator image built here from operator/Dockerfile.

What only a real container shows, and the process node cannot: the image's own user (non-root, from
its USER line) is enforced with ``runAsNonRoot``; ``readOnlyRootFilesystem`` makes a write to ``/``
fail while an emptyDir stays writable; the pod gets an IP on the node's bridge; ``kubectl logs`` reads
the container's output through the API server and the kubelet.

Marked ``realnode``: run with ``FINETUNE_REALNODE=1`` (``make test-realnode``), as root; otherwise
deselected (tests/conftest.py).
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import time

import pytest

from finetune_devcluster import images, tools
from finetune_devcluster.procnode import NODE_LABEL
from finetune_devcluster.realnode import NODE_KIND, RealNode
from tests.conftest import _raise_build_errors
from tests.integration.conftest import ROOT
from tests.integration.kubeutil import wait_for
from tests.integration.test_operator import ftj, running_pods, status, wait_phase

pytestmark = [pytest.mark.cluster, pytest.mark.realnode, pytest.mark.slow]

TAINT = "finetune.io/real-node"


@pytest.fixture(scope="module")
def operator_image():
    _raise_build_errors("operator-image")
    return images.build("operator")


@pytest.fixture(scope="module")
def realnode(cluster, operator_image):
    _raise_build_errors("kubelet", "kube-proxy", "pause-image", "coredns-image")
    node = RealNode(cluster, 0, images_to_load=[operator_image], taint=True).start()
    print(f"real node {node.name} Ready in {node.timings['ready_s']:.1f}s "
          f"(image import {node.timings['images_import_s']:.1f}s)")
    yield node
    node.stop()


def test_real_node_is_ready_with_its_own_address(cluster, realnode):
    node = json.loads(cluster.kubectl("get", "node", realnode.name, "-o", "json").stdout)
    addresses = {a["type"]: a["address"] for a in node["status"]["addresses"]}
    assert addresses["InternalIP"] == realnode.ip
    assert not ipaddress.ip_address(realnode.ip).is_loopback
    assert node["metadata"]["labels"][NODE_LABEL] == NODE_KIND
    info = node["status"]["nodeInfo"]
    assert info["kubeletVersion"] == "v1.33.13"
    assert info["containerRuntimeVersion"].startswith("containerd://")


SCRIPT = r"""
echo "uid=$(id -u) gid=$(id -g)"
if touch /probe 2>/scratch/err; then echo "ROOT-WRITABLE"; else echo "root write refused: $(cat /scratch/err)"; fi
echo hello > /scratch/f && echo "scratch: $(cat /scratch/f)"
python -c 'import finetune_operator, sys; print("operator package at", finetune_operator.__file__, sys.version.split()[0])'
grep CapEff /proc/self/status
"""


def test_operator_image_runs_non_root_with_read_only_root(cluster, realnode, operator_image, namespace):
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "ro-probe", "namespace": namespace},
        "spec": {
            "restartPolicy": "Never",
            "nodeSelector": {NODE_LABEL: NODE_KIND},
            "tolerations": [{"key": TAINT, "operator": "Exists"}],
            "automountServiceAccountToken": False,
            "terminationGracePeriodSeconds": 5,
            "containers": [{
                "name": "probe",
                "image": operator_image.ref,
                "imagePullPolicy": "Never",  # only the imported image; nothing can be pulled here
                "command": ["sh", "-c", SCRIPT],
                # no runAsUser: the kubelet must find the image's USER (10001) and accept it as non-root
                "securityContext": {"runAsNonRoot": True, "readOnlyRootFilesystem": True,
                                    "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
                "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}],
            }],
            "volumes": [{"name": "scratch", "emptyDir": {}}],
        },
    }
    t0 = time.monotonic()
    cluster.kubectl("apply", "-f", "-", input=json.dumps(pod))

    def finished():
        p = json.loads(cluster.kubectl("get", "pod", "-n", namespace, "ro-probe", "-o", "json").stdout)
        return p if p["status"].get("phase") in ("Succeeded", "Failed") else None

    p = wait_for("pod ro-probe finished", finished, timeout=120)
    took = time.monotonic() - t0
    logs = cluster.kubectl("logs", "-n", namespace, "ro-probe").stdout
    print(f"pod finished in {took:.1f}s; logs:\n{logs}")
    assert p["status"]["phase"] == "Succeeded", json.dumps(p["status"], indent=1)
    assert p["spec"]["nodeName"] == realnode.name
    assert ipaddress.ip_address(p["status"]["podIP"]) in ipaddress.ip_network(realnode.subnet)
    assert p["status"]["hostIP"] == realnode.ip
    assert "uid=10001 gid=10001" in logs
    assert "root write refused:" in logs and "Read-only file system" in logs and "ROOT-WRITABLE" not in logs
    assert "scratch: hello" in logs
    assert "operator package at /opt/venv/lib/python3.11/site-packages/finetune_operator/__init__.py 3.11" in logs
    assert "CapEff:\t0000000000000000" in logs


# ------------------------------------------------------------------ the operator from the chart, in-cluster

RELEASE, OPERATOR_NS = "ftrn", "finetune-system-rn"


def _helm(cluster, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(tools.ensure("helm")), *args], env=cluster.env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"helm {' '.join(args)}: {proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def operator_pod(cluster, kubectl, crd_installed, realnode, operator_image):
    """`helm install` of the chart with the image built here, its Deployment pinned to the real node: the
    operator runs as the chart's pod, with its own ServiceAccount token, RBAC, probes and securityContext."""
    repository, tag = operator_image.ref.rsplit(":", 1)
    _helm(cluster, "install", RELEASE, str(ROOT / "charts" / "finetune-operator"), "-n", OPERATOR_NS, "--create-namespace",
          "--set", f"image.repository={repository}", "--set", f"image.tag={tag}", "--set", "image.pullPolicy=Never",
          "--set", "resyncSeconds=2",
          "--set-json", f"nodeSelector={json.dumps({NODE_LABEL: NODE_KIND})}",
          "--set-json", f"tolerations={json.dumps([{'key': TAINT, 'operator': 'Exists'}])}")

    def ready():
        pods = kubectl.items("pods", OPERATOR_NS, "app.kubernetes.io/name=finetune-operator")
        ok = [p for p in pods if any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))]
        return ok[0] if ok else None

    try:
        t0 = time.monotonic()
        pod = wait_for("the operator pod Ready (its readiness probe through the kubelet)", ready, timeout=180)
        print(f"operator pod Ready in {time.monotonic() - t0:.1f}s")
        yield pod
    finally:
        print(cluster.kubectl("logs", "-n", OPERATOR_NS, "deploy/" + f"{RELEASE}-finetune-operator", "--tail=40", check=False).stdout)
        _helm(cluster, "uninstall", RELEASE, "-n", OPERATOR_NS, "--wait")


def test_the_charts_operator_pod_runs_on_the_real_node_as_its_image_user_and_passes_its_probes(cluster, kubectl, realnode, operator_pod, operator_image):
    spec = operator_pod["spec"]
    assert spec["nodeName"] == realnode.name
    assert ipaddress.ip_address(operator_pod["status"]["podIP"]) in ipaddress.ip_network(realnode.subnet)
    (container,) = operator_pod["status"]["containerStatuses"]
    assert container["image"].endswith(operator_image.ref.split("/", 1)[1]) and container["ready"] is True
    # Liveness: one period past the first checks, the container was never restarted.
    live = next(c for c in spec["containers"] if c["name"] == container["name"])["livenessProbe"]
    time.sleep(max(0, live["initialDelaySeconds"] + live["periodSeconds"] + 2 - _age_seconds(operator_pod)))
    again = kubectl.get("pod", operator_pod["metadata"]["name"], OPERATOR_NS)
    assert again["status"]["containerStatuses"][0]["restartCount"] == 0, json.dumps(again["status"], indent=1)
    # What the chart's securityContext does in a real container (kubectl exec: API server -> kubelet -> CRI).
    name = operator_pod["metadata"]["name"]
    out = cluster.kubectl("exec", "-n", OPERATOR_NS, name, "--", "sh", "-c",
                          "id -u; touch /probe 2>&1 || true; grep CapEff /proc/self/status; "
                          "ls /var/run/secrets/kubernetes.io/serviceaccount/").stdout
    print(out)
    assert out.splitlines()[0] != "0"  # runAsNonRoot, the image's user
    assert "Read-only file system" in out and "CapEff:\t0000000000000000" in out
    assert "token" in out and "ca.crt" in out  # the operator's own ServiceAccount token, mounted by the kubelet


def _age_seconds(pod) -> float:
    from datetime import datetime, timezone

    started = datetime.fromisoformat(pod["status"]["startTime"].replace("Z", "+00:00"))
    return (datetime.now(timezone.utc) - started).total_seconds()


def test_the_in_cluster_operator_runs_a_job_through_its_life_with_the_charts_rbac_and_no_403(cluster, kubectl, operator_pod, namespace):
    """Its in-cluster config (the `kubernetes` Service through kube-proxy, the mounted token and CA) and the
    chart's RBAC carry a whole job: create, suspend, resume, a failed group restarted, success, TTL deletion.
    The training pods land on the kwok nodes (they ask for GPUs; the real node has none)."""
    kubectl.run("create", "secret", "generic", "s3", "-n", namespace,
                "--from-literal=AWS_ACCESS_KEY_ID=a", "--from-literal=AWS_SECRET_ACCESS_KEY=b")
    kubectl.create(ftj("inside", namespace, storage={"credentialsSecret": {"name": "s3"}},
                       runPolicy={"backoffLimit": 1, "ttlSecondsAfterFinished": 1}))
    (pod,) = running_pods(kubectl, namespace, "inside", 0, 1)
    wait_phase(kubectl, namespace, "inside", "Running")
    assert status(kubectl, namespace, "inside")["observedGeneration"] == 1
    kubectl.run("patch", "ftj", "inside", "-n", namespace, "--type=merge", "-p", '{"spec":{"runPolicy":{"suspend":true}}}')
    wait_phase(kubectl, namespace, "inside", "Suspended")
    kubectl.run("patch", "ftj", "inside", "-n", namespace, "--type=merge", "-p", '{"spec":{"runPolicy":{"suspend":false}}}')
    (pod,) = running_pods(kubectl, namespace, "inside", 0, 1)
    cluster.pod_fail(namespace, pod["metadata"]["name"], exit_code=1, message="boom", wait=False)
    wait_for("restart", lambda: status(kubectl, namespace, "inside").get("restarts") == 1)
    (pod,) = running_pods(kubectl, namespace, "inside", 1, 1)
    cluster.pod_succeed(namespace, pod["metadata"]["name"])
    wait_for("ttl deletion", lambda: kubectl.get("ftj", "inside", namespace) is None, timeout=60)
    reasons = {e["reason"] for e in kubectl.items("events", namespace)
               if e["involvedObject"].get("name") == "inside" and e["involvedObject"].get("kind") == "FineTuneJob"}
    assert {"JobCreated", "Suspended"} <= reasons, reasons
    log = cluster.kubectl("logs", "-n", OPERATOR_NS, operator_pod["metadata"]["name"]).stdout  # kubectl logs, via the kubelet
    assert f"{namespace}/inside: JobCreated" in log, log[-3000:]
    assert "Forbidden" not in log and " 403" not in log, log[-3000:]
