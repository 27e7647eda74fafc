"""The local control plane really works: API server + RBAC, fake GPU nodes, scheduler, job controller,
garbage collector, namespace controller, the kwok pod-ending helpers, and the local S3 server."""

from __future__ import annotations

import subprocess
import time
import uuid

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from finetune_devcluster import tools
from finetune_devcluster.cluster import EXIT_ANNOTATION, MESSAGE_ANNOTATION, REASON_ANNOTATION

pytestmark = pytest.mark.timeout(180)
KWOK = {"type": "kwok"}  # other tests may add non-kwok nodes to the shared cluster


def wait_for(check, timeout: float = 30.0, interval: float = 0.2, what: str = "condition"):
    """Poll ``check()`` until it returns a truthy value; return it, or fail with the last value seen."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout}s waiting for {what}; last value: {last!r}")


def job_manifest(name: str, gpus: int = 1, backoff_limit: int = 0) -> client.V1Job:
    container = client.V1Container(
        name="train",
        image="registry.invalid/trainer:test",
        resources=client.V1ResourceRequirements(
            requests={"cpu": "1", "memory": "1Gi", "nvidia.com/gpu": str(gpus)},
            limits={"nvidia.com/gpu": str(gpus)},
        ),
    )
    return client.V1Job(
        metadata=client.V1ObjectMeta(name=name),
        spec=client.V1JobSpec(
            backoff_limit=backoff_limit,
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(labels={"app": name}),
                spec=client.V1PodSpec(
                    restart_policy="Never",
                    containers=[container],
                    node_selector={"nvidia.com/gpu.present": "true", **KWOK},
                ),
            ),
        ),
    )


def running_job_pod(core: client.CoreV1Api, ns: str, job: str) -> client.V1Pod:
    def check():
        pods = core.list_namespaced_pod(ns, label_selector=f"job-name={job}").items
        return pods[0] if pods and pods[0].status.phase == "Running" else None

    return wait_for(check, 60, what=f"a Running pod of job {ns}/{job}")


def job_condition(batch: client.BatchV1Api, ns: str, name: str, ctype: str):
    job = batch.read_namespaced_job(name, ns)
    for c in job.status.conditions or []:
        if c.type == ctype and c.status == "True":
            return job, c
    return None


# ------------------------------------------------------------------------------------------ api server


def test_apiserver_answers_with_pinned_version(cluster, kube):
    info = client.VersionApi(kube).get_code()
    assert info.git_version == tools.K8S_VERSION
    assert (info.major, info.minor) == ("1", "33")
    code, body = cluster.request("GET", "/readyz")
    assert code == 200 and body == "ok"
    # batch/v1 and RBAC are served
    groups = {g.name for g in client.ApisApi(kube).get_api_versions().groups}
    assert {"batch", "rbac.authorization.k8s.io", "coordination.k8s.io"} <= groups


def test_kubectl_subprocess_uses_cluster_env(cluster):
    env = cluster.env({"PATH": "/usr/bin:/bin", "HOME": str(cluster.workdir)})
    assert env["KUBECONFIG"] == str(cluster.kubeconfig)
    out = subprocess.run(
        ["kubectl", "get", "nodes", "-l", "type=kwok", "-o", "name"], env=env, capture_output=True, text=True, timeout=60, check=True
    ).stdout.split()
    assert sorted(out) == sorted(f"node/{n}" for n in cluster.node_names)


def test_rbac_is_enforced_for_service_account_tokens(cluster, kube, namespace):
    core, rbac = client.CoreV1Api(kube), client.RbacAuthorizationV1Api(kube)
    core.create_namespaced_service_account(namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="robot")))
    token = core.create_namespaced_service_account_token(
        "robot", namespace, client.AuthenticationV1TokenRequest(spec=client.V1TokenRequestSpec(audiences=[]))
    ).status.token
    cfg = client.Configuration()
    cfg.host, cfg.ssl_ca_cert = cluster.server, str(cluster.ca_file)
    cfg.api_key = {"BearerToken": token}
    cfg.api_key_prefix = {"BearerToken": "Bearer"}
    with client.ApiClient(cfg) as robot:
        who = client.AuthenticationV1Api(robot).create_self_subject_review(client.V1SelfSubjectReview())
        assert who.status.user_info.username == f"system:serviceaccount:{namespace}:robot"
        with pytest.raises(ApiException) as denied:
            client.CoreV1Api(robot).list_namespaced_config_map(namespace)
        assert denied.value.status == 403
        rbac.create_namespaced_role(
            namespace,
            client.V1Role(
                metadata=client.V1ObjectMeta(name="cm-reader"),
                rules=[client.V1PolicyRule(api_groups=[""], resources=["configmaps"], verbs=["list"])],
            ),
        )
        rbac.create_namespaced_role_binding(
            namespace,
            client.V1RoleBinding(
                metadata=client.V1ObjectMeta(name="robot-reads"),
                role_ref=client.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="Role", name="cm-reader"),
                subjects=[client.RbacV1Subject(kind="ServiceAccount", name="robot", namespace=namespace)],
            ),
        )
        # kube-root-ca.crt is published into every namespace by the root-ca-cert-publisher controller
        names = wait_for(
            lambda: (cms := _try(lambda: client.CoreV1Api(robot).list_namespaced_config_map(namespace)))
            and "kube-root-ca.crt" in (n := {c.metadata.name for c in cms.items})
            and n,
            20,
            what="RBAC grant (and kube-root-ca.crt)",
        )
        assert names == {"kube-root-ca.crt"}
        with pytest.raises(ApiException) as still_denied:
            client.CoreV1Api(robot).list_namespaced_secret(namespace)
        assert still_denied.value.status == 403


def _try(fn):
    try:
        return fn()
    except ApiException as e:
        if e.status == 403:
            return None
        raise


# ---------------------------------------------------------------------------------------------- nodes


def test_fake_nodes_advertise_gpus_and_are_schedulable(cluster, kube):
    nodes = client.CoreV1Api(kube).list_node(label_selector="type=kwok").items
    assert sorted(n.metadata.name for n in nodes) == sorted(cluster.node_names)
    assert len(nodes) == cluster.nodes >= 1
    for n in nodes:
        assert n.metadata.labels["nvidia.com/gpu.present"] == "true"
        assert n.metadata.annotations["kwok.x-k8s.io/node"] == "fake"
        for res in (n.status.capacity, n.status.allocatable):
            assert res["nvidia.com/gpu"] == "8"
            assert res["cpu"] == "32"
            assert res["memory"] == "256Gi"
            assert res["pods"] == "110"
        ready = {c.type: c.status for c in n.status.conditions}
        assert ready["Ready"] == "True"
        assert not n.spec.taints


def test_namespace_gets_default_service_account(kube, namespace):
    sa = client.CoreV1Api(kube).read_namespaced_service_account("default", namespace)
    assert sa.metadata.name == "default"


# ----------------------------------------------------------------------------------- jobs and pods


def test_job_pod_runs_on_fake_node_then_succeeds(cluster, kube, namespace):
    core, batch = client.CoreV1Api(kube), client.BatchV1Api(kube)
    batch.create_namespaced_job(namespace, job_manifest("ok", gpus=8))
    pod = running_job_pod(core, namespace, "ok")
    assert pod.spec.node_name in cluster.node_names
    assert pod.status.pod_ip and pod.status.pod_ip.startswith("10.244.")
    assert pod.status.container_statuses[0].state.running is not None
    job = batch.read_namespaced_job("ok", namespace)
    assert job.status.active == 1 and not job.status.succeeded

    ended = cluster.pod_succeed(namespace, pod.metadata.name, message="done")
    term = ended["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (term["exitCode"], term["reason"], term["message"]) == (0, "Completed", "done")

    job, cond = wait_for(lambda: job_condition(batch, namespace, "ok", "Complete"), 60, what="job Complete")
    assert job.status.succeeded == 1 and not job.status.active
    assert job.status.completion_time is not None


def test_job_pod_failure_carries_exit_code_and_message(cluster, kube, namespace):
    core, batch = client.CoreV1Api(kube), client.BatchV1Api(kube)
    batch.create_namespaced_job(namespace, job_manifest("bad", backoff_limit=0))
    pod = running_job_pod(core, namespace, "bad")
    cluster.pod_fail(namespace, pod.metadata.name, exit_code=3, message="CUDA out of memory")

    pod = core.read_namespaced_pod(pod.metadata.name, namespace)
    assert pod.status.phase == "Failed"
    term = pod.status.container_statuses[0].state.terminated
    assert (term.exit_code, term.reason, term.message) == (3, "Error", "CUDA out of memory")
    job, cond = wait_for(lambda: job_condition(batch, namespace, "bad", "Failed"), 60, what="job Failed")
    assert cond.reason == "BackoffLimitExceeded"
    assert job.status.failed == 1


def test_exit_annotation_on_pod_template_ends_pod_once_running(cluster, kube, namespace):
    core = client.CoreV1Api(kube)
    pod = client.V1Pod(
        metadata=client.V1ObjectMeta(name="quick", annotations={EXIT_ANNOTATION: "137", MESSAGE_ANNOTATION: "killed", REASON_ANNOTATION: "OOMKilled"}),
        spec=client.V1PodSpec(
            restart_policy="Never", node_selector=KWOK, containers=[client.V1Container(name="c", image="x")]
        ),
    )
    core.create_namespaced_pod(namespace, pod)
    got = wait_for(
        lambda: (p := core.read_namespaced_pod("quick", namespace)).status.phase == "Failed" and p, 60, what="pod Failed"
    )
    assert got.spec.node_name in cluster.node_names
    t = got.status.container_statuses[0].state.terminated
    assert (t.exit_code, t.reason, t.message) == (137, "OOMKilled", "killed")


def test_scheduler_respects_gpu_capacity(kube, namespace):
    core = client.CoreV1Api(kube)
    too_big = client.V1Pod(
        metadata=client.V1ObjectMeta(name="nine-gpus"),
        spec=client.V1PodSpec(
            node_selector=KWOK,
            containers=[
                client.V1Container(
                    name="c", image="x", resources=client.V1ResourceRequirements(limits={"nvidia.com/gpu": "9"})
                )
            ]
        ),
    )
    core.create_namespaced_pod(namespace, too_big)

    def unschedulable():
        p = core.read_namespaced_pod("nine-gpus", namespace)
        for c in p.status.conditions or []:
            if c.type == "PodScheduled" and c.status == "False" and c.reason == "Unschedulable":
                return c
        return None

    cond = wait_for(unschedulable, 30, what="PodScheduled=False")
    assert "Insufficient nvidia.com/gpu" in cond.message
    assert core.read_namespaced_pod("nine-gpus", namespace).spec.node_name is None


# ---------------------------------------------------------------------------------- other controllers


def test_garbage_collector_deletes_dependants(kube, namespace):
    core = client.CoreV1Api(kube)
    owner = core.create_namespaced_config_map(namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="owner")))
    ref = client.V1OwnerReference(api_version="v1", kind="ConfigMap", name="owner", uid=owner.metadata.uid)
    core.create_namespaced_config_map(
        namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="dependant", owner_references=[ref]))
    )
    core.delete_namespaced_config_map("owner", namespace, propagation_policy="Background")

    def gone():
        try:
            core.read_namespaced_config_map("dependant", namespace)
            return False
        except ApiException as e:
            return e.status == 404

    wait_for(gone, 60, what="the dependant ConfigMap to be garbage-collected")


def test_namespace_deletion_finishes(cluster, kube):
    core = client.CoreV1Api(kube)
    ns = f"doomed-{uuid.uuid4().hex[:6]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))
    wait_for(lambda: _exists(lambda: core.read_namespaced_service_account("default", ns)), 30, what="default SA")
    core.create_namespaced_config_map(ns, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="cm")))
    core.create_namespaced_pod(
        ns,
        client.V1Pod(
            metadata=client.V1ObjectMeta(name="p"),
            spec=client.V1PodSpec(node_selector=KWOK, containers=[client.V1Container(name="c", image="x")]),
        ),
    )
    wait_for(lambda: core.read_namespaced_pod("p", ns).status.phase == "Running", 60, what="pod Running")
    core.delete_namespace(ns)
    wait_for(lambda: not _exists(lambda: core.read_namespace(ns)), 90, interval=0.5, what=f"namespace {ns} to disappear")


def _exists(fn) -> bool:
    try:
        fn()
        return True
    except ApiException as e:
        if e.status == 404:
            return False
        raise


# ------------------------------------------------------------------------------------------------ s3


def test_s3_put_get_roundtrip(s3):
    bucket = s3.create_bucket(f"roundtrip-{uuid.uuid4().hex[:8]}")
    c = s3.client()
    body = b"weights\x00" * 1000
    c.put_object(Bucket=bucket, Key="runs/1/model.bin", Body=body)
    assert c.get_object(Bucket=bucket, Key="runs/1/model.bin")["Body"].read() == body
    keys = [o["Key"] for o in c.list_objects_v2(Bucket=bucket, Prefix="runs/")["Contents"]]
    assert keys == ["runs/1/model.bin"]
    assert s3.create_bucket(bucket) == bucket  # idempotent
    with pytest.raises(c.exceptions.NoSuchKey):
        c.get_object(Bucket=bucket, Key="missing")
