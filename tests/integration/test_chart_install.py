"""`helm install` the chart into the real control plane, then run the operator with the chart's own
ServiceAccount token: everything it does must be allowed by the chart's RBAC, and nothing more."""

from __future__ import annotations

import subprocess
import pytest

from finetune_devcluster import tools
from finetune_devcluster.stack import token_kubeconfig
from tests.integration.conftest import ROOT, OperatorProcess
from tests.integration.kubeutil import wait_for
from tests.integration.test_operator import ftj, running_pods, status, wait_phase

pytestmark = pytest.mark.cluster
RELEASE, NS = "fto", "finetune-system"


def helm(cluster, *args: str) -> subprocess.CompletedProcess:
    exe = str(tools.ensure("helm"))
    proc = subprocess.run([exe, *args], env=cluster.env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"helm {' '.join(args)}: {proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def release(cluster, kubectl, crd_installed):
    helm(cluster, "install", RELEASE, str(ROOT / "charts" / "finetune-operator"), "-n", NS, "--create-namespace",
         "--set", "image.tag=test", "--set", "resyncSeconds=2")
    yield
    helm(cluster, "uninstall", RELEASE, "-n", NS)


def can_i(kubectl, who: str, verb: str, resource: str, namespace: str) -> bool:
    resource, _, sub = resource.partition("/")
    extra = [f"--subresource={sub}"] if sub else []
    proc = kubectl.run("auth", "can-i", verb, resource, "-n", namespace, f"--as={who}", *extra, check=False)
    return proc.stdout.strip() == "yes"


def test_chart_installs_least_privilege_rbac(kubectl, release, namespace):
    dep = kubectl.get("deployment", f"{RELEASE}-finetune-operator", NS)
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"
    sa = f"system:serviceaccount:{NS}:{dep['spec']['template']['spec']['serviceAccountName']}"
    assert can_i(kubectl, sa, "create", "jobs.batch", namespace)
    assert can_i(kubectl, sa, "patch", "finetunejobs.finetune.io/status", namespace)
    assert can_i(kubectl, sa, "get", "secrets", namespace)
    assert not can_i(kubectl, sa, "list", "secrets", namespace)
    assert not can_i(kubectl, sa, "create", "pods", namespace)
    assert not can_i(kubectl, sa, "delete", "secrets", namespace)
    assert not can_i(kubectl, sa, "update", "customresourcedefinitions", namespace)
    # the training pods run as the namespace's default ServiceAccount with no token mounted, and that
    # account has no rights either
    trainer = f"system:serviceaccount:{namespace}:default"
    for verb, res in (("get", "pods"), ("list", "secrets"), ("create", "jobs.batch"), ("get", "finetunejobs.finetune.io")):
        assert not can_i(kubectl, trainer, verb, res, namespace)


def test_operator_works_under_the_charts_rbac(cluster, kubectl, release, operator, namespace, tmp_path):
    dep = kubectl.get("deployment", f"{RELEASE}-finetune-operator", NS)
    kubeconfig = token_kubeconfig(cluster, dep["spec"]["template"]["spec"]["serviceAccountName"], NS, tmp_path / "sa.kubeconfig")
    operator.stop()  # one operator at a time
    restricted = OperatorProcess(str(kubeconfig), tmp_path)
    try:
        restricted.start()
        kubectl.run("create", "secret", "generic", "s3", "-n", namespace,
                    "--from-literal=AWS_ACCESS_KEY_ID=a", "--from-literal=AWS_SECRET_ACCESS_KEY=b")
        kubectl.create(ftj("rbac", namespace, storage={"credentialsSecret": {"name": "s3"}}, runPolicy={"backoffLimit": 1, "ttlSecondsAfterFinished": 1}))
        (pod,) = running_pods(kubectl, namespace, "rbac", 0, 1)
        wait_phase(kubectl, namespace, "rbac", "Running")
        # suspend (patch jobs) and resume
        kubectl.run("patch", "ftj", "rbac", "-n", namespace, "--type=merge", "-p", '{"spec":{"runPolicy":{"suspend":true}}}')
        wait_phase(kubectl, namespace, "rbac", "Suspended")
        kubectl.run("patch", "ftj", "rbac", "-n", namespace, "--type=merge", "-p", '{"spec":{"runPolicy":{"suspend":false}}}')
        (pod,) = running_pods(kubectl, namespace, "rbac", 0, 1)
        # a failure (delete + create jobs), then success, then TTL (delete finetunejobs)
        cluster.pod_fail(namespace, pod["metadata"]["name"], exit_code=1, message="boom", wait=False)
        wait_for("restart", lambda: status(kubectl, namespace, "rbac").get("restarts") == 1)
        (pod,) = running_pods(kubectl, namespace, "rbac", 1, 1)
        cluster.pod_succeed(namespace, pod["metadata"]["name"])
        wait_for("ttl deletion", lambda: kubectl.get("ftj", "rbac", namespace) is None, timeout=60)
        log = restricted.tail(100000)
        assert "Forbidden" not in log and " 403" not in log, log[-3000:]
    finally:
        restricted.stop()
        operator.start()
