"""The trainer image on the real node: a FineTuneJob from examples/ whose pod is a real container from the
image built here from trainer-image/Dockerfile, under the securityContext the operator sets (non-root,
read-only root filesystem, no capabilities, no API token), reading and writing MinIO over the pod network.

What the process node cannot show: that the image has what the trainer needs, that the trainer writes
nowhere but its volumes (a write anywhere else fails on the read-only root and the job with it), that the
pod has no Kubernetes API token, and ``kubectl logs`` of a training pod. The operator runs as a local
process here (test_realnode.py runs the chart's operator in-cluster).

Marked ``realnode``: run with ``FINETUNE_REALNODE=1`` (``make test-realnode``), as root.
"""

from __future__ import annotations

import time

import pytest

from finetune_devcluster import images
from finetune_devcluster.assets import seed_bucket
from finetune_devcluster.realnode import NODE_KIND, RealNode
from finetune_devcluster.s3 import LocalS3
from tests.conftest import _raise_build_errors
from tests.integration.test_e2e_training import BUCKET, example, keys, read_json, secret
from tests.integration.test_operator import events_for, pods_of, wait_phase
from finetune_devcluster.procnode import NODE_LABEL

pytestmark = [pytest.mark.cluster, pytest.mark.realnode, pytest.mark.slow, pytest.mark.s3]

TAINT = "finetune.io/real-node"


@pytest.fixture(scope="module")
def trainer_image():
    _raise_build_errors("trainer-image")
    return images.build("trainer")


@pytest.fixture(scope="module")
def trainer_node(cluster, trainer_image):
    _raise_build_errors("kubelet", "kube-proxy", "pause-image", "coredns-image")
    node = RealNode(cluster, 0, images_to_load=[trainer_image], taint=True).start()
    print(f"real node {node.name} Ready in {node.timings['ready_s']:.1f}s (image import {node.timings['images_import_s']:.1f}s)")
    yield node
    node.stop()


@pytest.fixture(scope="module")
def node_s3(trainer_node):
    """MinIO on the node's address: the pods reach it over their bridge, the tests and the operator too."""
    _raise_build_errors("minio")
    with LocalS3(host=trainer_node.ip) as server:
        yield server


@pytest.fixture(scope="module")
def node_data(node_s3, tmp_path_factory):
    return seed_bucket(node_s3.client(), BUCKET, tmp_path_factory.mktemp("assets"))


def on_the_real_node(manifest: dict, image: images.BuiltImage) -> dict:
    manifest["spec"]["resources"].update(image=image.ref, nodeSelector={NODE_LABEL: NODE_KIND},
                                         tolerations=[{"key": TAINT, "operator": "Exists"}])
    return manifest


def test_the_trainer_image_fine_tunes_as_non_root_on_a_read_only_root_with_no_api_token(
        cluster, kubectl, operator, trainer_node, trainer_image, node_s3, node_data, namespace):
    secret(kubectl, namespace, node_s3)
    t0 = time.monotonic()
    kubectl.create(on_the_real_node(example("sentiment-classification.yaml", "sentiment", namespace, node_s3), trainer_image))
    try:
        st = wait_phase(kubectl, namespace, "sentiment", "Succeeded", timeout=900)
    finally:  # the trainer's own log, whatever happened (kubectl logs through the kubelet)
        print(cluster.kubectl("logs", "-n", namespace, "-l", "job-name", "--tail=80", check=False).stdout)
    print(f"Succeeded in {time.monotonic() - t0:.0f}s")
    (pod,) = pods_of(kubectl, namespace, "sentiment", 0)
    spec = pod["spec"]
    assert spec["nodeName"] == trainer_node.name and pod["status"]["hostIP"] == trainer_node.ip
    (container,) = spec["containers"]
    (status,) = pod["status"]["containerStatuses"]
    assert container["image"] == trainer_image.ref and status["state"]["terminated"]["exitCode"] == 0
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["runAsNonRoot"] is True and sc["capabilities"]["drop"] == ["ALL"]
    # No Kubernetes API token: no projected token volume, nothing mounted at the ServiceAccount path.
    assert spec["automountServiceAccountToken"] is False
    assert not any("serviceAccountToken" in str(v.get("projected", {})) for v in spec.get("volumes", []))
    assert not any(m["mountPath"].startswith("/var/run/secrets/kubernetes.io") for m in container.get("volumeMounts", []))
    # The run itself, as in the process-node e2e test: model, reports and gain back in status and MinIO.
    run = f"runs/{namespace}/sentiment"
    assert st["progress"]["stage"] == "done" and st["modelUri"] == f"s3://{BUCKET}/{run}/model"
    assert st["gain"]["metric"] == "accuracy" and st["gain"]["final"] > st["gain"]["baseline"]
    assert f"{run}/model/adapter_model.safetensors" in keys(node_s3, f"{run}/model/")
    assert read_json(node_s3, f"{run}/data-report.json")["total"]["rows_read"] >= 400
    # kubectl logs of a training pod: the API server reads the container's log through the kubelet.
    logs = cluster.kubectl("logs", "-n", namespace, pod["metadata"]["name"]).stdout
    assert "final trainable parameter checksum" in logs and "stage: done" in logs, logs[-3000:]
    assert {"JobCreated", "PodsRunning", "Completed"} <= {e["reason"] for e in events_for(kubectl, namespace, "sentiment")}
