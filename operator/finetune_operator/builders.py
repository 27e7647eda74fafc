"""Pure builders for the objects a FineTuneJob owns: a headless Service, a ConfigMap with the trainer
config, and one Indexed batch/v1 Job per attempt. No I/O here; everything is unit-tested as dicts."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from finetune_api import env as pod_env
from finetune_api.documents import Lineage
from finetune_api.spec import API_GROUP, API_VERSION, KIND, MLFLOW_CREDENTIAL_KEYS, FineTuneJobSpec, bytes_quantity, quantity_bytes
from finetune_api.sweep import LABEL_SWEEP, LABEL_TRIAL, SWEEP_KIND
from finetune_operator.config import METRICS_PORT, OperatorDefaults
from finetune_operator.lineage import lineage_env

MANAGED_BY = "finetune-operator"
LABEL_JOB = f"{API_GROUP}/job"
LABEL_ATTEMPT = f"{API_GROUP}/attempt"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_NAME = "app.kubernetes.io/name"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
CONFIG_MOUNT = "/etc/finetune"
CONFIG_FILE = "job.yaml"
MASTER_PORT = 29500
METRICS_PORT_NAME = "metrics"
# torchrun runs max(gpusPerNode, 1) processes per pod; the spec caps gpusPerNode at 16.
MAX_PROCS_PER_NODE = 16
TERMINATION_LOG = pod_env.DEFAULT_TERMINATION_LOG
# Ephemeral storage a pod uses besides its emptyDirs (its root filesystem is read-only): the container
# logs and the termination message, which the kubelet counts against the pod's ephemeral-storage limit.
LOG_STORAGE_BYTES = 1 << 30
CREDENTIAL_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
OPTIONAL_CREDENTIAL_KEYS = ("AWS_SESSION_TOKEN",)


@dataclass(frozen=True)
class SweepTrial:
    """The FineTuneSweep a trial FineTuneJob belongs to (see :func:`sweep_trial`)."""

    name: str
    uid: str
    number: int


def sweep_trial(meta: Mapping[str, Any]) -> SweepTrial | None:
    """A FineTuneJob's sweep, when it is a sweep's trial: labels finetune.io/sweep and finetune.io/sweep-trial
    (a number) and a controller ownerReference of kind FineTuneSweep with the label's name. None otherwise."""
    labels_ = meta.get("labels") or {}
    name, number = labels_.get(LABEL_SWEEP), str(labels_.get(LABEL_TRIAL) or "")
    if not name or not number.isdigit():
        return None
    for ref in meta.get("ownerReferences") or ():
        if ref.get("controller") and ref.get("kind") == SWEEP_KIND and ref.get("name") == name and ref.get("uid"):
            return SweepTrial(name=name, uid=ref["uid"], number=int(number))
    return None


@dataclass(frozen=True)
class Owner:
    """Identity of the FineTuneJob, enough to name children and point owner references at it."""

    name: str
    namespace: str
    uid: str
    generation: int = 1
    sweep: SweepTrial | None = None  # a sweep's trial: the trainer nests its MLflow run under the sweep's

    @classmethod
    def of(cls, meta: Mapping[str, Any]) -> Owner:
        """From the FineTuneJob's metadata."""
        return cls(name=meta["name"], namespace=meta["namespace"], uid=meta["uid"], generation=int(meta.get("generation") or 1),
                   sweep=sweep_trial(meta))

    def reference(self) -> dict[str, Any]:
        return {
            "apiVersion": f"{API_GROUP}/{API_VERSION}",
            "kind": KIND,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }


def service_name(owner: Owner) -> str:
    return owner.name


def config_map_name(owner: Owner) -> str:
    return f"{owner.name}-config"


def job_name(owner: Owner, attempt: int) -> str:
    """One Job per attempt, so a restart never waits for the old Job's deletion to finish."""
    return f"{owner.name}-{attempt}"


def labels(owner: Owner, attempt: int | None = None) -> dict[str, str]:
    out = {LABEL_MANAGED_BY: MANAGED_BY, LABEL_NAME: "finetune-trainer", LABEL_JOB: owner.name}
    if attempt is not None:
        out[LABEL_ATTEMPT] = str(attempt)
    return out


def _meta(name: str, owner: Owner, attempt: int | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": owner.namespace,
        "labels": labels(owner, attempt),
        "ownerReferences": [owner.reference()],
    }


def procs_per_node(spec: FineTuneJobSpec) -> int:
    """torchrun's --nproc-per-node: one process per GPU, one when the pod has none."""
    return max(spec.resources.gpus_per_node, 1)


def metrics_port_name(local_rank: int) -> str:
    """Container port name of a local rank's metrics: ``metrics`` for local rank 0 (the name a
    PodMonitor has always used), ``metrics-<i>`` for the others; at most 10 characters (limit 15)."""
    return METRICS_PORT_NAME if local_rank == 0 else f"{METRICS_PORT_NAME}-{local_rank}"


def metrics_container_ports(base: int, procs: int) -> list[dict[str, Any]]:
    """One named containerPort per local rank (rank i listens on base + i, see
    finetune_trainer.metrics), so a PodMonitor scrapes every rank, not only local rank 0.
    Empty when the trainer's metrics are off (base 0)."""
    if base <= 0:
        return []
    return [{"name": metrics_port_name(i), "containerPort": base + i} for i in range(procs)]


def build_service(owner: Owner) -> dict[str, Any]:
    """Headless Service: gives pod 0 a stable DNS name (<job>-0.<service>) for torchrun's rendezvous.

    Its ``metrics`` port is informational only (a headless Service load-balances nothing and nothing
    scrapes through it: the chart's PodMonitor finds every rank's port on the pods themselves), so
    it lists local rank 0's port alone."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(service_name(owner), owner),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,  # rank 0 must resolve before any pod is Ready
            "selector": {LABEL_JOB: owner.name, LABEL_MANAGED_BY: MANAGED_BY},
            "ports": [
                {"name": "rendezvous", "port": MASTER_PORT, "targetPort": MASTER_PORT},
                {"name": METRICS_PORT_NAME, "port": METRICS_PORT, "targetPort": METRICS_PORT},
            ],
        },
    }


def render_trainer_config(owner: Owner, spec: FineTuneJobSpec) -> str:
    """The trainer's config is the FineTuneJob itself, with every default filled in."""
    doc = {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": KIND,
        "metadata": {"name": owner.name, "namespace": owner.namespace, "uid": owner.uid, "generation": owner.generation},
        "spec": spec.wire(),
    }
    return yaml.safe_dump(doc, sort_keys=False)


def build_config_map(owner: Owner, spec: FineTuneJobSpec) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(config_map_name(owner), owner),
        "data": {CONFIG_FILE: render_trainer_config(owner, spec)},
    }


def _env(owner: Owner, spec: FineTuneJobSpec, attempt: int, defaults: OperatorDefaults, lineage: Lineage | None = None) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": "NODE_RANK", "valueFrom": {"fieldRef": {"fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}},
        {"name": pod_env.JOB_NAME, "value": owner.name},
        {"name": pod_env.NAMESPACE, "value": owner.namespace},
        {"name": pod_env.ATTEMPT, "value": str(attempt)},
        {"name": pod_env.JOB_UID, "value": owner.uid},
        {"name": pod_env.METRICS_PORT, "value": str(defaults.metrics_port)},
        {"name": pod_env.TERMINATION_LOG, "value": TERMINATION_LOG},
        {"name": "HF_HOME", "value": "/cache/huggingface"},
        {"name": pod_env.CACHE_DIR, "value": "/cache"},
        {"name": pod_env.WORK_DIR, "value": "/tmp/work"},
        {"name": "HOME", "value": "/tmp"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    if owner.sweep is not None:  # the trainer finds or creates the sweep's MLflow parent run (finetune_trainer.tracking)
        env += [{"name": pod_env.SWEEP_NAME, "value": owner.sweep.name}, {"name": pod_env.SWEEP_UID, "value": owner.sweep.uid},
                {"name": pod_env.SWEEP_TRIAL, "value": str(owner.sweep.number)}]
    storage = spec.storage
    if storage.endpoint:
        env.append({"name": "AWS_ENDPOINT_URL", "value": storage.endpoint})
    if storage.region:
        env.append({"name": "AWS_DEFAULT_REGION", "value": storage.region})
    if storage.credentials_secret:
        secret = storage.credentials_secret.name
        for key in CREDENTIAL_KEYS:
            env.append({"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}})
        for key in OPTIONAL_CREDENTIAL_KEYS:
            env.append({"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key, "optional": True}}})
    mlflow = spec.tracking.mlflow
    if mlflow is not None and mlflow.credentials_secret:  # basic auth or a token: each key optional
        for key in MLFLOW_CREDENTIAL_KEYS:
            env.append({"name": key, "valueFrom": {"secretKeyRef": {"name": mlflow.credentials_secret.name, "key": key, "optional": True}}})
    if lineage is not None:  # spec.model.fromJob, resolved (finetune_operator.lineage)
        env.extend(lineage_env(lineage))
    reserved = {e["name"] for e in env} | set(pod_env.LINEAGE) | set(pod_env.SWEEP)  # a user's env cannot forge a lineage or a sweep either
    for extra in spec.resources.env or []:
        if extra.name not in reserved:  # the operator's own variables win
            env.append({"name": extra.name, "value": extra.value})
    return env


def trainer_command(owner: Owner, spec: FineTuneJobSpec, attempt: int) -> list[str]:
    """torchrun with a static rendezvous at pod 0 of this attempt's Job, reached through the headless
    Service; the node rank comes from the Job's completion index (env NODE_RANK)."""
    res = spec.resources
    master = f"{job_name(owner, attempt)}-0.{service_name(owner)}.{owner.namespace}.svc"
    return [
        "torchrun",
        f"--nnodes={res.nodes}",
        f"--nproc-per-node={procs_per_node(spec)}",
        "--node-rank=$(NODE_RANK)",
        f"--master-addr={master}",
        f"--master-port={MASTER_PORT}",
        "-m",
        "finetune_trainer",
        "--config",
        f"{CONFIG_MOUNT}/{CONFIG_FILE}",
    ]


def ephemeral_storage(spec: FineTuneJobSpec) -> str:
    """The pod's ephemeral-storage request and limit: both disk emptyDirs full (``resources.cacheSize`` +
    ``resources.scratchSize``, their sizeLimits) plus the logs. /dev/shm is memory, not counted here."""
    res = spec.resources
    return bytes_quantity(quantity_bytes(res.cache_size) + quantity_bytes(res.scratch_size) + LOG_STORAGE_BYTES)


def _resources(spec: FineTuneJobSpec) -> dict[str, Any]:
    """Requests equal limits: cpu and memory when the spec sets them, ephemeral storage always (a pod
    that fills its disk is evicted, alone, instead of filling the node's)."""
    res = spec.resources
    amounts: dict[str, str] = {}
    if res.cpu:
        amounts["cpu"] = res.cpu
    if res.memory:
        amounts["memory"] = res.memory
    amounts["ephemeral-storage"] = ephemeral_storage(spec)
    limits = dict(amounts)
    if res.gpus_per_node > 0:
        limits["nvidia.com/gpu"] = str(res.gpus_per_node)
    return {"requests": amounts, "limits": limits}


def _container(owner: Owner, spec: FineTuneJobSpec, attempt: int, defaults: OperatorDefaults, lineage: Lineage | None = None) -> dict[str, Any]:
    """The trainer container: torchrun, read-only root, the config mounted, scratch on emptyDirs."""
    res = spec.resources
    return {
        "name": "trainer",
        "image": res.image or defaults.trainer_image,
        "imagePullPolicy": defaults.image_pull_policy,
        "command": trainer_command(owner, spec, attempt),
        "env": _env(owner, spec, attempt, defaults, lineage),
        "ports": [
            {"name": "rendezvous", "containerPort": MASTER_PORT},
            *metrics_container_ports(defaults.metrics_port, procs_per_node(spec)),
        ],
        "resources": _resources(spec),
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": True},
            {"name": "cache", "mountPath": "/cache"},
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "dshm", "mountPath": "/dev/shm"},
        ],
    }


def _pod_spec(owner: Owner, spec: FineTuneJobSpec, attempt: int, defaults: OperatorDefaults, lineage: Lineage | None = None) -> dict[str, Any]:
    """The training pod: non-root, no API token, a subdomain of the headless Service for rendezvous."""
    res = spec.resources
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "subdomain": service_name(owner),
        "automountServiceAccountToken": False,  # training pods get no Kubernetes API access
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": defaults.termination_grace_seconds,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 10001,
            "runAsGroup": 10001,
            "fsGroup": 10001,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [_container(owner, spec, attempt, defaults, lineage)],
        "volumes": [
            {"name": "config", "configMap": {"name": config_map_name(owner)}},
            {"name": "cache", "emptyDir": {"sizeLimit": res.cache_size}},
            {"name": "tmp", "emptyDir": {"sizeLimit": res.scratch_size}},
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": res.shm_size}},
        ],
    }
    if res.node_selector:
        pod_spec["nodeSelector"] = dict(res.node_selector)
    if res.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in res.tolerations]
    if res.affinity:
        pod_spec["affinity"] = dict(res.affinity)
    if res.priority_class_name:
        pod_spec["priorityClassName"] = res.priority_class_name
    if res.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": s.name} for s in res.image_pull_secrets]
    return pod_spec


def build_job(owner: Owner, spec: FineTuneJobSpec, attempt: int, defaults: OperatorDefaults, *, suspend: bool = False,
              lineage: Lineage | None = None) -> dict[str, Any]:
    """One Indexed Job: completions = parallelism = nodes. backoffLimit 0 because a torchrun group
    cannot continue short a member: the operator restarts the whole group instead. ``lineage``: the
    resolved spec.model.fromJob (status.lineage), passed to the trainer as env."""
    res = spec.resources
    meta = _meta(job_name(owner, attempt), owner, attempt)
    queued = bool(res.queue_name)
    if queued:
        meta["labels"][KUEUE_QUEUE_LABEL] = res.queue_name
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": meta,
        "spec": {
            "completionMode": "Indexed",
            "completions": res.nodes,
            "parallelism": res.nodes,
            "backoffLimit": 0,
            # Kueue admits a suspended Job as one gang; without Kueue the operator's suspend decides.
            "suspend": bool(suspend or queued),
            "template": {"metadata": {"labels": labels(owner, attempt)}, "spec": _pod_spec(owner, spec, attempt, defaults, lineage)},
        },
    }
