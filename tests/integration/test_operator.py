"""The real operator on the real API server (with controller-manager, scheduler and kwok GPU nodes).

Each test gets its own namespace and asserts on what the API server holds.
"""

from __future__ import annotations

import time

import pytest
import requests

from tests.integration.kubeutil import wait_for

pytestmark = pytest.mark.cluster


def ftj(name: str, namespace: str, **spec_overrides) -> dict:
    spec = {
        "model": {"uri": "s3://models/tiny"},
        "dataset": {"train": "s3://data/train.jsonl"},
        "output": {"uri": f"s3://out/{name}"},
        "resources": {"nodes": 1, "gpusPerNode": 1},
    }
    for key, value in spec_overrides.items():
        spec[key] = {**spec.get(key, {}), **value} if isinstance(value, dict) else value
    return {"apiVersion": "finetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name, "namespace": namespace}, "spec": spec}


def status(kubectl, ns, name) -> dict:
    obj = kubectl.get("ftj", name, ns)
    return (obj or {}).get("status") or {}


def wait_phase(kubectl, ns, name, phase, timeout=60) -> dict:
    def reached():
        s = status(kubectl, ns, name)
        if s.get("phase") in ("Succeeded", "Failed") and s.get("phase") != phase:  # finished otherwise: say why now
            raise RuntimeError(f"{name} ended {s.get('phase')} ({s.get('reason')}): {s.get('message')}")
        return s.get("phase") == phase and s

    return wait_for(f"{name} phase {phase}", reached, timeout=timeout)


def pods_of(kubectl, ns, name, attempt=None):
    sel = f"finetune.io/job={name}" + (f",finetune.io/attempt={attempt}" if attempt is not None else "")
    return kubectl.items("pods", ns, sel)


def running_pods(kubectl, ns, name, attempt, n):
    def ready():
        pods = [p for p in pods_of(kubectl, ns, name, attempt) if p["status"].get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")]
        return pods if len(pods) == n else None

    return wait_for(f"{n} running pod(s) of {name} attempt {attempt}", ready, timeout=60)


def events_for(kubectl, ns, name) -> list[dict]:
    return [e for e in kubectl.items("events", ns) if e.get("involvedObject", {}).get("name") == name
            and e.get("involvedObject", {}).get("kind") == "FineTuneJob"]


def test_create_makes_headless_service_and_indexed_job_per_rank(kubectl, operator, namespace):
    kubectl.create(ftj("ddp", namespace, resources={"nodes": 2, "gpusPerNode": 8}))
    job = wait_for("job ddp-0", lambda: kubectl.get("job", "ddp-0", namespace))
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"], spec["backoffLimit"]) == ("Indexed", 2, 2, 0)
    owner = job["metadata"]["ownerReferences"][0]
    assert owner["kind"] == "FineTuneJob" and owner["name"] == "ddp" and owner["controller"] is True
    container = spec["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert "--master-addr=ddp-0-0.ddp." + namespace + ".svc" in container["command"]
    svc = kubectl.get("service", "ddp", namespace)
    assert svc["spec"]["clusterIP"] == "None"
    cm = kubectl.get("configmap", "ddp-config", namespace)
    assert "kind: FineTuneJob" in cm["data"]["job.yaml"]
    policy = kubectl.get("networkpolicy", "ddp-pods", namespace)  # created with the chart's RBAC
    assert policy["metadata"]["ownerReferences"][0]["uid"] == owner["uid"]
    assert policy["spec"]["podSelector"]["matchLabels"]["finetune.io/job"] == "ddp"

    pods = running_pods(kubectl, namespace, "ddp", 0, 2)
    # each rank is one pod with its own completion index, on a fake GPU node
    assert sorted(p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] for p in pods) == ["0", "1"]
    assert all(p["spec"]["nodeName"] for p in pods)
    assert all(p["spec"]["automountServiceAccountToken"] is False for p in pods)
    st = wait_phase(kubectl, namespace, "ddp", "Running")
    assert st["observedGeneration"] == 1 and st["startTime"]
    running = next(c for c in st["conditions"] if c["type"] == "Running")
    assert running["status"] == "True" and running["reason"] == "PodsRunning" and running["lastTransitionTime"]
    table = kubectl.run("get", "ftj", "ddp", "-n", namespace).stdout
    assert "PHASE" in table and "Running" in table and "RESTARTS" in table


def test_pods_succeed_then_job_succeeds_with_completion_time(kubectl, operator, namespace, cluster):
    kubectl.create(ftj("ok", namespace))
    (pod,) = running_pods(kubectl, namespace, "ok", 0, 1)
    cluster.pod_succeed(namespace, pod["metadata"]["name"])
    st = wait_phase(kubectl, namespace, "ok", "Succeeded")
    assert st["completionTime"] >= st["startTime"]
    reasons = wait_for("Completed event", lambda: (r := [e["reason"] for e in events_for(kubectl, namespace, "ok")]) and "Completed" in r and r)
    assert "JobCreated" in reasons and "PodsRunning" in reasons


def test_pod_failure_restarts_group_then_fails_after_backoff_limit(kubectl, operator, namespace, cluster):
    kubectl.create(ftj("flaky", namespace, runPolicy={"backoffLimit": 1}))
    (pod,) = running_pods(kubectl, namespace, "flaky", 0, 1)
    cluster.pod_fail(namespace, pod["metadata"]["name"], exit_code=1, message="RuntimeError: NCCL timeout", wait=False)
    st = wait_for("restart", lambda: (s := status(kubectl, namespace, "flaky")).get("restarts") == 1 and s)
    assert st["attempt"] == 1
    assert "NCCL timeout" in st["failureReason"]
    # the whole group is recreated as a new Job; the old one goes away
    (pod,) = running_pods(kubectl, namespace, "flaky", 1, 1)
    wait_for("old job deleted", lambda: kubectl.get("job", "flaky-0", namespace) is None)
    wait_phase(kubectl, namespace, "flaky", "Running")
    cluster.pod_fail(namespace, pod["metadata"]["name"], exit_code=1, message="RuntimeError: NCCL timeout again", wait=False)
    st = wait_phase(kubectl, namespace, "flaky", "Failed")
    assert st["reason"] == "BackoffLimitExceeded"
    assert "NCCL timeout again" in st["message"]
    assert st["restarts"] == 1
    failed = next(c for c in st["conditions"] if c["type"] == "Failed")
    assert failed["status"] == "True" and failed["reason"] == "BackoffLimitExceeded"


def test_permanent_trainer_error_fails_without_retry(kubectl, operator, namespace, cluster):
    kubectl.create(ftj("badlabel", namespace))
    (pod,) = running_pods(kubectl, namespace, "badlabel", 0, 1)
    cluster.pod_fail(namespace, pod["metadata"]["name"], exit_code=14, message="UnknownLabel: row 3 has label 'meh', not in spec.model.labels", wait=False)
    st = wait_phase(kubectl, namespace, "badlabel", "Failed")
    assert st["reason"] == "UnknownLabel"
    assert "'meh'" in st["message"] and st["restarts"] == 0
    time.sleep(3)
    assert kubectl.get("job", "badlabel-1", namespace) is None


def test_deleting_the_job_garbage_collects_children(kubectl, operator, namespace):
    kubectl.create(ftj("gone", namespace))
    running_pods(kubectl, namespace, "gone", 0, 1)
    kubectl.run("delete", "ftj", "gone", "-n", namespace, "--wait=true", timeout=60)
    for kind, name in (("job", "gone-0"), ("service", "gone"), ("configmap", "gone-config"), ("networkpolicy", "gone-pods")):
        wait_for(f"{kind} {name} collected", lambda: kubectl.get(kind, name, namespace) is None, timeout=60)
    wait_for("pods collected", lambda: pods_of(kubectl, namespace, "gone") == [], timeout=60)


def test_suspend_and_resume(kubectl, operator, namespace):
    kubectl.create(ftj("pause", namespace))
    running_pods(kubectl, namespace, "pause", 0, 1)
    wait_phase(kubectl, namespace, "pause", "Running")
    kubectl.run("patch", "ftj", "pause", "-n", namespace, "--type=merge", "-p", '{"spec":{"runPolicy":{"suspend":true}}}')
    wait_phase(kubectl, namespace, "pause", "Suspended")
    wait_for("job suspended", lambda: kubectl.get("job", "pause-0", namespace)["spec"]["suspend"] is True)
    wait_for("pods stopped", lambda: [p for p in pods_of(kubectl, namespace, "pause") if not p["metadata"].get("deletionTimestamp")] == [], timeout=60)
    kubectl.run("patch", "ftj", "pause", "-n", namespace, "--type=merge", "-p", '{"spec":{"runPolicy":{"suspend":false}}}')
    wait_for("job resumed", lambda: kubectl.get("job", "pause-0", namespace)["spec"]["suspend"] is False)
    running_pods(kubectl, namespace, "pause", 0, 1)
    st = wait_phase(kubectl, namespace, "pause", "Running")
    assert st["restarts"] == 0
    suspended = next(c for c in st["conditions"] if c["type"] == "Suspended")
    assert suspended["status"] == "False"


def test_kueue_queue_name_creates_suspended_labelled_job(kubectl, operator, namespace):
    kubectl.create(ftj("queued", namespace, resources={"queueName": "gpu-queue", "nodes": 2}))
    job = wait_for("job queued-0", lambda: kubectl.get("job", "queued-0", namespace))
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    assert job["spec"]["suspend"] is True
    st = wait_for("Queued", lambda: (s := status(kubectl, namespace, "queued")).get("reason") == "Queued" and s)
    assert st["phase"] == "Pending"
    assert pods_of(kubectl, namespace, "queued") == []


def test_ttl_after_finished_deletes_the_job(kubectl, operator, namespace, cluster):
    kubectl.create(ftj("ttl", namespace, runPolicy={"ttlSecondsAfterFinished": 2}))
    (pod,) = running_pods(kubectl, namespace, "ttl", 0, 1)
    cluster.pod_succeed(namespace, pod["metadata"]["name"])
    wait_for("ttl deletion", lambda: kubectl.get("ftj", "ttl", namespace) is None, timeout=60)
    wait_for("children collected", lambda: kubectl.get("job", "ttl-0", namespace) is None, timeout=60)


def test_active_deadline_fails_the_job(kubectl, operator, namespace):
    kubectl.create(ftj("slow", namespace, runPolicy={"activeDeadlineSeconds": 3}))
    st = wait_phase(kubectl, namespace, "slow", "Failed", timeout=60)
    assert st["reason"] == "DeadlineExceeded"
    wait_for("job deleted", lambda: kubectl.get("job", "slow-0", namespace) is None, timeout=60)


def test_missing_credentials_secret_fails_with_what_to_fix(kubectl, operator, namespace):
    kubectl.create(ftj("nosecret", namespace, storage={"credentialsSecret": {"name": "s3-creds"}}))
    st = wait_phase(kubectl, namespace, "nosecret", "Failed")
    assert st["reason"] == "SecretNotFound"
    assert "kubectl create secret generic s3-creds" in st["message"]
    assert kubectl.get("job", "nosecret-0", namespace) is None


def test_secret_with_missing_keys_fails_and_values_never_leak(kubectl, operator, namespace):
    kubectl.run("create", "secret", "generic", "half", "-n", namespace, "--from-literal=AWS_ACCESS_KEY_ID=AKIASECRETVALUE")
    kubectl.create(ftj("halfsecret", namespace, storage={"credentialsSecret": {"name": "half"}}))
    st = wait_phase(kubectl, namespace, "halfsecret", "Failed")
    assert st["reason"] == "SecretMissingKeys" and "AWS_SECRET_ACCESS_KEY" in st["message"]
    assert "AKIASECRETVALUE" not in str(kubectl.get("ftj", "halfsecret", namespace))
    assert "AKIASECRETVALUE" not in operator.tail(10000)


def test_valid_secret_is_passed_by_reference_only(kubectl, operator, namespace):
    kubectl.run("create", "secret", "generic", "s3", "-n", namespace,
                "--from-literal=AWS_ACCESS_KEY_ID=AKIAEXAMPLE", "--from-literal=AWS_SECRET_ACCESS_KEY=SUPERSECRET")
    kubectl.create(ftj("withsecret", namespace, storage={"credentialsSecret": {"name": "s3"}, "endpoint": "http://minio:9000"}))
    job = wait_for("job", lambda: kubectl.get("job", "withsecret-0", namespace))
    env = {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "s3", "key": "AWS_SECRET_ACCESS_KEY"}
    assert "SUPERSECRET" not in str(job) and "SUPERSECRET" not in str(kubectl.get("configmap", "withsecret-config", namespace))


def test_operator_metrics_and_liveness(kubectl, operator, namespace):
    kubectl.create(ftj("metrics", namespace))
    wait_phase(kubectl, namespace, "metrics", "Running")
    assert requests.get(f"{operator.url}/healthz", timeout=5).status_code == 200

    def scraped():
        text = requests.get(f"{operator.url}/metrics", timeout=5).text
        running = [l for l in text.splitlines() if l.startswith('finetune_operator_jobs{phase="Running"}')]
        return text if running and float(running[0].split()[-1]) >= 1 else None

    text = wait_for("operator metrics with a Running job", scraped, timeout=20)
    reconciles = [l for l in text.splitlines() if l.startswith("finetune_operator_reconciles_total{")]
    assert sum(float(l.split()[-1]) for l in reconciles) > 0
    assert "finetune_operator_reconcile_duration_seconds_bucket" in text


def test_operator_killed_mid_reconcile_converges_without_duplicates(kubectl, operator, namespace):
    operator.kill()
    try:
        # created while the operator is down: handled when it starts
        kubectl.create(ftj("offline", namespace))
        kubectl.create(ftj("offline2", namespace, resources={"nodes": 2}))
    finally:
        operator.start()
    wait_for("both jobs", lambda: kubectl.get("job", "offline-0", namespace) and kubectl.get("job", "offline2-0", namespace))
    # kill it again as soon as it has acted, then restart: nothing is created twice
    operator.kill()
    operator.start()
    running_pods(kubectl, namespace, "offline2", 0, 2)
    wait_phase(kubectl, namespace, "offline", "Running")
    time.sleep(3)
    jobs = kubectl.items("jobs", namespace)
    assert sorted(j["metadata"]["name"] for j in jobs) == ["offline-0", "offline2-0"]
    assert len(kubectl.items("services", namespace)) == 2
    assert len(pods_of(kubectl, namespace, "offline2")) == 2
    created = [e for e in events_for(kubectl, namespace, "offline") if e["reason"] == "JobCreated"]
    assert sum(e.get("count", 1) for e in created) == 1


def test_kubectl_explain_describes_fields(kubectl, crd_installed):
    out = kubectl.run("explain", "ftj.spec.hyperparameters.learningRate").stdout
    assert "Peak learning rate" in out
    out = kubectl.run("explain", "ftj.spec.dataset.leakageCheck").stdout
    assert "validation/test example" in out


def test_lost_node_restarts_the_group_elsewhere(kubectl, operator, namespace, cluster):
    kubectl.create(ftj("lostnode", namespace, runPolicy={"backoffLimit": 2}))
    (pod,) = running_pods(kubectl, namespace, "lostnode", 0, 1)
    node = pod["spec"]["nodeName"]
    try:
        kubectl.run("delete", "node", node, "--wait=false")  # the machine is gone
        st = wait_for("restart after node loss", lambda: (s := status(kubectl, namespace, "lostnode")).get("restarts") == 1 and s, timeout=120)
        assert st["phase"] in ("Restarting", "Pending", "Running")
        (pod,) = running_pods(kubectl, namespace, "lostnode", 1, 1)
        assert pod["spec"]["nodeName"] != node
        wait_phase(kubectl, namespace, "lostnode", "Running")
    finally:
        cluster.create_nodes()  # bring the node back for the other tests
