"""Children are ours by uid, not by name or label (issue 9 §4), on the real API server.

A FineTuneJob deleted and re-created under the same name must not adopt the old one's children, and
a pod anyone can create with our labels and a termination message must not fail someone's job.
"""

from __future__ import annotations

import time

import pytest

from tests.integration.kubeutil import wait_for
from tests.integration.test_operator import ftj, running_pods, status, wait_phase

pytestmark = pytest.mark.cluster


def test_recreated_job_does_not_adopt_the_old_ones_children(kubectl, operator, namespace, cluster):
    kubectl.create(ftj("again", namespace))
    (pod,) = running_pods(kubectl, namespace, "again", 0, 1)
    cluster.pod_succeed(namespace, pod["metadata"]["name"])
    wait_phase(kubectl, namespace, "again", "Succeeded")
    old_uid = kubectl.get("ftj", "again", namespace)["metadata"]["uid"]
    # orphan: the old Job (Complete), Service, ConfigMap and NetworkPolicy linger without an owner
    kubectl.run("delete", "ftj", "again", "-n", namespace, "--cascade=orphan", "--wait=true")
    wait_for("old job orphaned", lambda: not (kubectl.get("job", "again-0", namespace)["metadata"].get("ownerReferences")))
    kubectl.create(ftj("again", namespace))
    st = wait_for("conflict", lambda: (s := status(kubectl, namespace, "again")).get("reason") == "ChildNameConflict" and s)
    assert st["phase"] == "Pending" and "not controlled by this FineTuneJob" in st["message"]
    time.sleep(3)
    st = status(kubectl, namespace, "again")
    assert (st["phase"], st["reason"]) == ("Pending", "ChildNameConflict")  # not Succeeded from the old Job
    assert kubectl.get("job", "again-0", namespace)["status"].get("succeeded") == 1  # left alone
    kubectl.run("delete", "job/again-0", "service/again", "configmap/again-config", "networkpolicy/again-pods", "-n", namespace, "--wait=true")
    (pod,) = running_pods(kubectl, namespace, "again", 0, 1)
    new_uid = kubectl.get("ftj", "again", namespace)["metadata"]["uid"]
    job = kubectl.get("job", "again-0", namespace)
    assert new_uid != old_uid and job["metadata"]["ownerReferences"][0]["uid"] == new_uid
    wait_phase(kubectl, namespace, "again", "Running")


def test_a_foreign_pod_with_our_labels_cannot_fail_the_job(kubectl, operator, namespace, cluster):
    kubectl.create(ftj("victim", namespace))
    (pod,) = running_pods(kubectl, namespace, "victim", 0, 1)
    wait_phase(kubectl, namespace, "victim", "Running")
    labels = {k: v for k, v in pod["metadata"]["labels"].items() if k.startswith(("finetune.io/", "app.kubernetes.io/"))}
    forged = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "forged", "namespace": namespace, "labels": labels,
                     "annotations": {"batch.kubernetes.io/job-completion-index": "0"}},
        "spec": {"nodeName": pod["spec"]["nodeName"], "tolerations": pod["spec"].get("tolerations", []),
                 "containers": [{"name": "trainer", "image": "busybox"}]},
    }
    kubectl.create(forged)
    cluster.pod_fail(namespace, "forged", exit_code=14, message="UnknownLabel: forged by another tenant")
    time.sleep(6)  # three resyncs and the pod events
    st = status(kubectl, namespace, "victim")
    assert (st["phase"], st["restarts"], st.get("failureReason")) == ("Running", 0, None)
    assert kubectl.get("job", "victim-1", namespace) is None


def test_names_whose_children_would_not_fit_are_rejected_at_admission(kubectl, crd_installed, namespace):
    from finetune_api.spec import MAX_NAME_LENGTH

    too_long = kubectl.create(ftj("a" * (MAX_NAME_LENGTH + 1), namespace), check=False)
    assert too_long.returncode != 0 and "metadata.name" in too_long.stderr and f"more than {MAX_NAME_LENGTH}" in too_long.stderr
    dotted = kubectl.create(ftj("has.dots", namespace), check=False)
    assert dotted.returncode != 0 and "metadata.name" in dotted.stderr
    assert kubectl.create(ftj("a" * MAX_NAME_LENGTH, namespace)).returncode == 0


def test_a_child_the_api_server_rejects_fails_the_job_with_its_message(kubectl, operator, namespace):
    kubectl.create(ftj("badtol", namespace, resources={"nodes": 1, "gpusPerNode": 1, "tolerations": [{"key": "a", "operator": "Bogus"}]}))
    st = wait_phase(kubectl, namespace, "badtol", "Failed", timeout=30)
    assert st["reason"] == "ChildRejected"
    assert "Job badtol-0" in st["message"] and "Bogus" in st["message"]
    assert kubectl.get("job", "badtol-0", namespace) is None


def test_an_unschedulable_pod_shows_the_schedulers_reason(kubectl, operator, namespace):
    kubectl.create(ftj("nowhere", namespace, resources={"nodes": 1, "gpusPerNode": 1, "nodeSelector": {"finetune.io/no-such-node": "x"}}))
    st = wait_for("Unschedulable", lambda: (s := status(kubectl, namespace, "nowhere")).get("reason") == "Unschedulable" and s)
    assert st["phase"] == "Pending"
    assert st["message"].startswith("pod nowhere-0-0-") and "nodes are available" in st["message"]


def test_an_output_inside_the_dataset_is_rejected_at_admission(kubectl, crd_installed, namespace):
    bad = ftj("clobber", namespace, dataset={"train": "s3://data/sets/train.jsonl"}, output={"uri": "s3://data/sets"})
    proc = kubectl.create(bad, check=False)
    assert proc.returncode != 0 and "output.uri must not equal, contain or lie inside dataset.train" in proc.stderr
    fine = ftj("beside", namespace, dataset={"train": "s3://data/sets/train.jsonl"}, output={"uri": "s3://data/runs/beside"})
    assert kubectl.create(fine).returncode == 0
