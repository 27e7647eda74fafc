"""The chart's least-privilege restrictions on the real API server: an operator started with
namespace opt-in, labelled credentials Secrets and allow-lists of images and PriorityClasses refuses
what they exclude before any child (Job, pod) exists, with the reason in status and an Event.

The session's unrestricted operator would act on these jobs too, so it is stopped for this module
and started again afterwards."""

from __future__ import annotations

import uuid

import pytest

from tests.integration.conftest import ROOT, OperatorProcess
from tests.integration.kubeutil import wait_for
from tests.integration.test_operator import events_for, ftj, pods_of, status, wait_phase

pytestmark = pytest.mark.cluster

SECRET_VALUE = "LEASTPRIVSECRETVALUE"
RESTRICTIONS = {
    # the test namespaces carry finetune.io/test=true (tests/conftest.py): they are the opted-in ones
    "FINETUNE_NAMESPACE_SELECTOR": "finetune.io/test=true",
    "FINETUNE_CREDENTIALS_SECRET_LABELS": "finetune.io/credentials=true",
    "FINETUNE_ALLOWED_IMAGES": "registry.example.com/ml/",
    "FINETUNE_ALLOWED_PRIORITY_CLASSES": "batch-low",
}


@pytest.fixture(scope="module")
def restricted(cluster, crd_installed, operator, tmp_path_factory):
    operator.stop()
    op = OperatorProcess(str(cluster.kubeconfig), tmp_path_factory.mktemp("restricted-operator"), RESTRICTIONS)
    op.start()
    try:
        yield op
    finally:
        op.stop()
        operator.start()


def secret(kubectl, namespace: str, name: str, *, labelled: bool) -> None:
    kubectl.run("create", "secret", "generic", name, "-n", namespace,
                "--from-literal=AWS_ACCESS_KEY_ID=AKIA" + SECRET_VALUE, f"--from-literal=AWS_SECRET_ACCESS_KEY={SECRET_VALUE}")
    if labelled:
        kubectl.run("label", "secret", name, "-n", namespace, "finetune.io/credentials=true")


def assert_refused_before_any_child(kubectl, namespace: str, name: str, reason: str) -> dict:
    st = wait_phase(kubectl, namespace, name, "Failed")
    assert st["reason"] == reason, st
    assert kubectl.get("job", f"{name}-0", namespace) is None and pods_of(kubectl, namespace, name) == []
    assert kubectl.get("configmap", f"{name}-config", namespace) is None
    wait_for(f"{reason} event", lambda: [e for e in events_for(kubectl, namespace, name) if e["reason"] == reason])
    return st


def test_a_disallowed_image_fails_with_the_reason_and_no_pod(kubectl, restricted, namespace):
    secret(kubectl, namespace, "s3", labelled=True)
    kubectl.create(ftj("miner", namespace, storage={"credentialsSecret": {"name": "s3"}}, resources={"image": "evil.io/miner:1"}))
    st = assert_refused_before_any_child(kubectl, namespace, "miner", "ImageNotAllowed")
    assert "evil.io/miner:1" in st["message"] and "registry.example.com/ml/" in st["message"]


def test_a_disallowed_priority_class_fails_with_the_reason_and_no_pod(kubectl, restricted, namespace):
    kubectl.create(ftj("vip", namespace, resources={"priorityClassName": "system-cluster-critical"}))
    st = assert_refused_before_any_child(kubectl, namespace, "vip", "PriorityClassNotAllowed")
    assert "batch-low" in st["message"]


def test_an_unlabelled_secret_fails_with_the_reason_and_no_pod(kubectl, restricted, namespace):
    secret(kubectl, namespace, "plain", labelled=False)
    kubectl.create(ftj("unlabelled", namespace, storage={"credentialsSecret": {"name": "plain"}}))
    st = assert_refused_before_any_child(kubectl, namespace, "unlabelled", "SecretNotLabelled")
    assert f"kubectl -n {namespace} label secret plain finetune.io/credentials=true" in st["message"]
    assert SECRET_VALUE not in str(kubectl.get("ftj", "unlabelled", namespace)) and SECRET_VALUE not in restricted.tail(10000)


def test_a_labelled_secret_and_an_allowed_image_start_the_job(kubectl, restricted, namespace):
    """The control: the same operator, given what it allows, creates the Job (the metadata-only read of
    the labelled Secret works against the real API server)."""
    secret(kubectl, namespace, "s3", labelled=True)
    kubectl.create(ftj("allowed", namespace, storage={"credentialsSecret": {"name": "s3"}},
                       resources={"image": "registry.example.com/ml/trainer:1", "priorityClassName": "batch-low"}))
    job = wait_for("job", lambda: kubectl.get("job", "allowed-0", namespace))
    pod = job["spec"]["template"]["spec"]
    assert pod["containers"][0]["image"] == "registry.example.com/ml/trainer:1" and pod["automountServiceAccountToken"] is False
    assert "serviceAccountName" not in pod or pod["serviceAccountName"] == "default"


def test_a_namespace_that_has_not_opted_in_gets_nothing_until_it_is_labelled(kubectl, restricted):
    ns = f"lp-optin-{uuid.uuid4().hex[:6]}"
    kubectl.run("create", "namespace", ns)
    try:
        wait_for("default ServiceAccount", lambda: kubectl.get("serviceaccount", "default", ns))
        secret(kubectl, ns, "s3", labelled=True)
        kubectl.create(ftj("waiting", ns, storage={"credentialsSecret": {"name": "s3"}}))
        st = wait_for("NamespaceNotEnabled", lambda: (s := status(kubectl, ns, "waiting")).get("reason") == "NamespaceNotEnabled" and s)
        assert st["phase"] == "Pending" and f"kubectl label namespace {ns} finetune.io/test=true" in st["message"]
        assert kubectl.get("job", "waiting-0", ns) is None and kubectl.get("service", "waiting", ns) is None
        kubectl.run("label", "namespace", ns, "finetune.io/test=true")
        wait_for("job once the namespace opted in", lambda: kubectl.get("job", "waiting-0", ns), timeout=60)
        assert status(kubectl, ns, "waiting")["reason"] in ("JobCreated", "WaitingForPods", "PodsRunning")
    finally:
        kubectl.run("delete", "namespace", ns, "--wait=false", check=False)


def test_without_cluster_wide_secrets_the_operator_reads_secrets_only_where_granted(cluster, kubectl, restricted, namespace, tmp_path):
    """rbac.clusterWideSecrets: false, installed for real: the chart's ServiceAccount may read Secrets
    only in rbac.credentialsNamespaces, and a job elsewhere fails SecretForbidden, before any pod."""
    from finetune_devcluster.stack import token_kubeconfig
    from tests.integration.test_chart_install import can_i, helm

    release, release_ns = "ftlp", "finetune-lp"
    other = f"lp-nosecrets-{uuid.uuid4().hex[:6]}"
    kubectl.run("create", "namespace", other)
    kubectl.run("label", "namespace", other, "finetune.io/test=true")
    helm(cluster, "install", release, str(ROOT / "charts" / "finetune-operator"), "-n", release_ns, "--create-namespace",
         "--set", "replicaCount=0", "--set", "rbac.clusterWideSecrets=false", "--set", f"rbac.credentialsNamespaces={{{namespace}}}")
    restricted.stop()
    sa_op = None
    try:
        sa = f"{release}-finetune-operator"
        who = f"system:serviceaccount:{release_ns}:{sa}"
        assert can_i(kubectl, who, "get", "secrets", namespace)
        assert not can_i(kubectl, who, "get", "secrets", other) and not can_i(kubectl, who, "get", "secrets", "kube-system")
        assert can_i(kubectl, who, "create", "jobs.batch", other)  # the rest of its rights stay cluster-wide
        kubeconfig = token_kubeconfig(cluster, sa, release_ns, tmp_path / "sa.kubeconfig")
        sa_op = OperatorProcess(str(kubeconfig), tmp_path, {k: v for k, v in RESTRICTIONS.items() if k != "FINETUNE_CREDENTIALS_SECRET_LABELS"})
        sa_op.start()
        for ns in (namespace, other):
            secret(kubectl, ns, "s3", labelled=True)
            kubectl.create(ftj("creds", ns, storage={"credentialsSecret": {"name": "s3"}}))
        wait_for("job where Secrets are granted", lambda: kubectl.get("job", "creds-0", namespace))
        st = assert_refused_before_any_child(kubectl, other, "creds", "SecretForbidden")
        assert f"namespace {other}" in st["message"]
    finally:
        if sa_op is not None:
            sa_op.stop()
        helm(cluster, "uninstall", release, "-n", release_ns)
        kubectl.run("delete", "namespace", other, release_ns, "--wait=false", check=False)
        restricted.start()


def test_the_devcluster_demo_secret_is_labelled_for_the_secure_mode(cluster, kubectl, namespace):
    from finetune_api.failures import CREDENTIALS_SECRET_LABEL
    from finetune_devcluster import stack

    for _ in range(2):  # `make demo` runs it on every start
        stack.ensure_secret(cluster, namespace, "AKIADEMO", "demo-secret")
    labels = kubectl.get("secret", stack.SECRET, namespace)["metadata"].get("labels") or {}
    assert labels.get(CREDENTIALS_SECRET_LABEL[0]) == CREDENTIALS_SECRET_LABEL[1]
