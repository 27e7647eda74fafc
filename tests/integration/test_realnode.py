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
import time

import pytest

from finetune_devcluster import images
from finetune_devcluster.procnode import NODE_LABEL
from finetune_devcluster.realnode import NODE_KIND, RealNode
from tests.conftest import _raise_build_errors
from tests.integration.kubeutil import wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.realnode, pytest.mark.slow]

TAINT = "finetune.io/real-node"


@pytest.fixture(scope="module")
def operator_image():
    _raise_build_errors("operator-image")
    return images.build("operator")


@pytest.fixture(scope="module")
def realnode(cluster, operator_image):
    _raise_build_errors("kubelet", "pause-image")
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
