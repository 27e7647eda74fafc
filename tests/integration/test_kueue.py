"""The operator's Kueue path against the real Kueue (finetune_devcluster.kueue.LocalKueue: the pinned Kueue
manager as a local process, with its CRDs and its webhooks registered by URL) and the real Job controller.

A ClusterQueue whose quota is smaller than two jobs; FineTuneJobs with ``resources.queueName``; pods on
kwok nodes, ended by the tests (``cluster.pod_succeed``), so the Jobs really complete and Kueue really
frees their quota. What is shown, not assumed: the second job stays Pending/Queued (its Job suspended, no
pods, its Workload without quota) while the first runs, and runs once the first finished; a 2-node job
whose total request exceeds the quota left gets no pod at all (while a smaller single-node job behind it
is admitted), then both of its pods together once quota frees; a preempted job goes back to the queue
without a restart and runs again; and Kueue's webhooks really run on Job writes.
"""

from __future__ import annotations

import time
import uuid

import pytest

from tests.integration.kubeutil import wait_for
from tests.integration.test_operator import ftj, pods_of, running_pods, status, wait_phase

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

KUEUE = "kueue.x-k8s.io/v1beta2"


@pytest.fixture(autouse=True)
def _kueue_log_on_failure(request, kueue):
    yield
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        print(f"\n---- kueue log (tail) ----\n{kueue.logs(60)}")


@pytest.fixture
def queue(kubectl, kueue, namespace):
    """A ResourceFlavor, a ClusterQueue with the quota the test passes, and a LocalQueue in the test's
    namespace; returns a function ``quota -> LocalQueue name``."""
    made: list[tuple[str, str]] = []

    def make(cpu: str, gpu: str, preemption: dict | None = None) -> str:
        name = f"cq-{uuid.uuid4().hex[:6]}"
        kubectl.apply({"apiVersion": KUEUE, "kind": "ResourceFlavor", "metadata": {"name": name}})
        resources = {"cpu": cpu, "nvidia.com/gpu": gpu, "memory": "1Ti", "ephemeral-storage": "10Ti"}
        kubectl.apply({
            "apiVersion": KUEUE, "kind": "ClusterQueue", "metadata": {"name": name},
            "spec": {
                "namespaceSelector": {},
                **({"preemption": preemption} if preemption else {}),
                "resourceGroups": [{
                    "coveredResources": list(resources),
                    "flavors": [{"name": name, "resources": [{"name": r, "nominalQuota": q} for r, q in resources.items()]}],
                }],
            },
        })
        kubectl.apply({"apiVersion": KUEUE, "kind": "LocalQueue", "metadata": {"name": "team", "namespace": namespace},
                       "spec": {"clusterQueue": name}})
        made.extend([("clusterqueue", name), ("resourceflavor", name)])

        def active():
            cq = kubectl.get("clusterqueue", name) or {}
            return any(c["type"] == "Active" and c["status"] == "True" for c in (cq.get("status") or {}).get("conditions") or [])

        wait_for(f"ClusterQueue {name} Active", active, timeout=30)
        return "team"

    yield make
    for kind, name in made:
        kubectl.run("delete", kind, name, "--wait=false", check=False)


def job(kubectl, ns, name):
    return kubectl.get("job", f"{name}-0", ns)


def workload(kubectl, ns, name) -> dict | None:
    """The Workload Kueue made for the FineTuneJob's Job (owned by it)."""
    for w in kubectl.items("workloads.kueue.x-k8s.io", ns):
        if any(o["kind"] == "Job" and o["name"] == f"{name}-0" for o in w["metadata"].get("ownerReferences") or []):
            return w
    return None


def condition(obj: dict | None, kind: str) -> bool:
    return any(c["type"] == kind and c["status"] == "True" for c in ((obj or {}).get("status") or {}).get("conditions") or [])


def admitted(kubectl, ns, name) -> dict:
    return wait_for(f"{name}'s Workload admitted", lambda: (w := workload(kubectl, ns, name)) and condition(w, "Admitted") and w, timeout=60)


def assert_held(kubectl, ns, name, queue):
    """Pending/Queued, its Job suspended, no pods, its Workload pending without quota."""
    st = wait_for(f"{name} Queued", lambda: (s := status(kubectl, ns, name)).get("reason") == "Queued" and s)
    assert st["phase"] == "Pending" and queue in st["message"]
    assert job(kubectl, ns, name)["spec"]["suspend"] is True
    assert pods_of(kubectl, ns, name) == []
    w = wait_for(f"{name}'s Workload", lambda: workload(kubectl, ns, name))
    assert not condition(w, "QuotaReserved") and not condition(w, "Admitted")
    return w


def stays_held(kubectl, ns, name, seconds=4.0):
    """Still Queued, suspended and without pods over a few of the operator's (2 s) and Kueue's resyncs."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert status(kubectl, ns, name)["reason"] == "Queued"
        assert job(kubectl, ns, name)["spec"]["suspend"] is True and pods_of(kubectl, ns, name) == []
        time.sleep(0.5)


def finish(cluster, kubectl, ns, name, nodes=1):
    for pod in running_pods(kubectl, ns, name, 0, nodes):
        cluster.pod_succeed(ns, pod["metadata"]["name"])
    wait_phase(kubectl, ns, name, "Succeeded")
    wait_for(f"{name}'s Workload Finished", lambda: condition(workload(kubectl, ns, name), "Finished"), timeout=30)


def test_second_job_waits_for_quota_then_runs(kubectl, operator, namespace, cluster, queue):
    q = queue(cpu="6", gpu="6")  # one 4-CPU 4-GPU job fits, two do not
    res = {"queueName": q, "nodes": 1, "gpusPerNode": 4, "cpu": "4"}
    kubectl.create(ftj("first", namespace, resources=res))
    w = admitted(kubectl, namespace, "first")
    assert w["status"]["admission"]["clusterQueue"].startswith("cq-")
    running_pods(kubectl, namespace, "first", 0, 1)
    assert job(kubectl, namespace, "first")["spec"]["suspend"] is False  # Kueue lifted it
    assert wait_phase(kubectl, namespace, "first", "Running")["reason"] == "PodsRunning"

    kubectl.create(ftj("second", namespace, resources=res))
    w2 = assert_held(kubectl, namespace, "second", q)
    assert "insufficient" in " ".join(c.get("message", "") for c in w2["status"].get("conditions") or []).lower()
    stays_held(kubectl, namespace, "second")  # while the first keeps running

    finish(cluster, kubectl, namespace, "first")
    admitted(kubectl, namespace, "second")
    running_pods(kubectl, namespace, "second", 0, 1)
    assert wait_phase(kubectl, namespace, "second", "Running")["reason"] == "PodsRunning"
    finish(cluster, kubectl, namespace, "second")


def test_multi_node_group_is_admitted_all_or_nothing(kubectl, operator, namespace, cluster, queue):
    q = queue(cpu="16", gpu="8")
    kubectl.create(ftj("big", namespace, resources={"queueName": q, "nodes": 1, "gpusPerNode": 4, "cpu": "2"}))
    admitted(kubectl, namespace, "big")
    running_pods(kubectl, namespace, "big", 0, 1)

    # 2 x 3 GPUs = 6 > the 4 left; one of its pods (3) would fit, yet none is created
    kubectl.create(ftj("pair", namespace, resources={"queueName": q, "nodes": 2, "gpusPerNode": 3, "cpu": "2"}))
    assert_held(kubectl, namespace, "pair", q)
    # a single-node job that fits the 4 left is admitted past it (BestEffortFIFO) ...
    kubectl.create(ftj("small", namespace, resources={"queueName": q, "nodes": 1, "gpusPerNode": 2, "cpu": "2"}))
    admitted(kubectl, namespace, "small")
    running_pods(kubectl, namespace, "small", 0, 1)
    # ... and the pair still has no pod at all: 2 GPUs are left, less than it needs
    assert_held(kubectl, namespace, "pair", q)
    stays_held(kubectl, namespace, "pair")

    finish(cluster, kubectl, namespace, "big")  # 6 left: the whole pair fits
    w = admitted(kubectl, namespace, "pair")
    (assignment,) = w["status"]["admission"]["podSetAssignments"]
    assert assignment["count"] == 2 and assignment["resourceUsage"]["nvidia.com/gpu"] == "6"
    pods = running_pods(kubectl, namespace, "pair", 0, 2)
    assert len({p["metadata"]["name"] for p in pods}) == 2
    assert wait_phase(kubectl, namespace, "pair", "Running")["reason"] == "PodsRunning"
    finish(cluster, kubectl, namespace, "pair", nodes=2)
    finish(cluster, kubectl, namespace, "small")


def test_kueue_webhooks_are_live(kubectl, kueue, namespace):
    """Kueue's own webhooks run on Job writes (registered by URL): its mutating webhook suspends a Job
    that names a queue even when created running (a queue that does not exist, so that Kueue's reconciler
    cannot admit and unsuspend it before we look), and its validating webhook refuses a bad queue name."""
    pod = {"restartPolicy": "Never", "containers": [{"name": "c", "image": "busybox"}]}

    def plain_job(name, queue_name):
        return {"apiVersion": "batch/v1", "kind": "Job",
                "metadata": {"name": name, "namespace": namespace, "labels": {"kueue.x-k8s.io/queue-name": queue_name}},
                "spec": {"suspend": False, "template": {"spec": pod}}}

    kubectl.create(plain_job("direct", "no-such-queue"))
    assert kubectl.get("job", "direct", namespace)["spec"]["suspend"] is True
    refused = kubectl.create(plain_job("bad", "Not_A_Name"), check=False)
    assert refused.returncode != 0 and "vjob.kb.io" in refused.stderr, refused.stderr


def test_preempted_job_goes_back_to_the_queue_without_a_restart(kubectl, operator, namespace, cluster, queue):
    """Kueue evicts a running low-priority job for a higher one: it suspends the Job (the Job controller
    removes its pods); the operator shows Pending/Queued again (no failure, no restart counted, the same
    attempt) and the job runs again once the quota is back."""
    q = queue(cpu="8", gpu="4", preemption={"withinClusterQueue": "LowerPriority"})
    made = []
    for name, value in (("low", 10), ("high", 1000)):
        pc = f"{namespace}-{name}"
        kubectl.apply({"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass", "metadata": {"name": pc}, "value": value})
        made.append(pc)
    try:
        res = {"queueName": q, "nodes": 1, "gpusPerNode": 4, "cpu": "2"}
        kubectl.create(ftj("low", namespace, resources={**res, "priorityClassName": made[0]}))
        admitted(kubectl, namespace, "low")
        running_pods(kubectl, namespace, "low", 0, 1)
        wait_phase(kubectl, namespace, "low", "Running")

        kubectl.create(ftj("high", namespace, resources={**res, "priorityClassName": made[1]}))
        admitted(kubectl, namespace, "high")
        running_pods(kubectl, namespace, "high", 0, 1)
        w = wait_for("low's Workload evicted", lambda: (x := workload(kubectl, namespace, "low")) and condition(x, "Evicted") and x)
        assert next(c for c in w["status"]["conditions"] if c["type"] == "Evicted")["reason"] == "Preempted"
        assert_held(kubectl, namespace, "low", q)
        stays_held(kubectl, namespace, "low")
        st = status(kubectl, namespace, "low")
        assert (st["attempt"], st["restarts"]) == (0, 0) and not st.get("failureReason")

        finish(cluster, kubectl, namespace, "high")
        admitted(kubectl, namespace, "low")
        running_pods(kubectl, namespace, "low", 0, 1)
        assert wait_phase(kubectl, namespace, "low", "Running")["attempt"] == 0
        finish(cluster, kubectl, namespace, "low")
    finally:
        for pc in made:
            kubectl.run("delete", "priorityclass", pc, "--wait=false", check=False)
