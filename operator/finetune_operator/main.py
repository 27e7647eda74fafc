"""Kopf registrations only: every handler delegates to :mod:`finetune_operator.handlers`.

Importing this module registers the handlers with Kopf's default registry.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

import kopf
from kubernetes import config as k8s_config

from finetune_api import spec as S
from finetune_operator import builders as B
from finetune_operator import handlers, metrics
from finetune_operator.config import OperatorConfig
from finetune_operator.state import job_view, pod_view

CONFIG = OperatorConfig.from_env()
FTJ = (S.API_GROUP, S.API_VERSION, S.PLURAL)
CHILDREN = {B.LABEL_MANAGED_BY: B.MANAGED_BY}
PREFIX = S.API_GROUP

_phases: dict[tuple[str, str], str | None] = {}
log = logging.getLogger(__name__)


def plain(value: Any) -> Any:
    """Detach a Kopf body view into plain dicts/lists (index values outlive the event)."""
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    # Kopf state under our own prefix, never in status (which is ours and typed).
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=PREFIX, key="last-handled-configuration")
    settings.persistence.finalizer = f"{PREFIX}/finalizer"
    # Without a server-side timeout a watch can hang silently forever on some clusters
    # (nolar/kopf#204, #585): ask the server to close streams and reconnect regularly.
    settings.watching.server_timeout = 270
    settings.watching.client_timeout = 300
    settings.watching.connect_timeout = 30
    settings.networking.request_timeout = 60
    settings.networking.connect_timeout = 30
    # Watch only our own children, filtered by the API server.
    settings.watching.label_selectors["jobs"] = f"{B.LABEL_MANAGED_BY}={B.MANAGED_BY}"
    settings.watching.label_selectors["pods"] = f"{B.LABEL_MANAGED_BY}={B.MANAGED_BY}"
    settings.posting.reporting_component = "finetune-operator"
    settings.posting.event_name_prefix = "finetune-"
    settings.execution.max_workers = 8
    try:
        k8s_config.load_incluster_config()
    except k8s_config.ConfigException:
        k8s_config.load_kube_config()
    asyncio.get_running_loop().create_task(_heartbeat())


async def _heartbeat() -> None:
    while True:
        metrics.HEARTBEAT.beat()
        metrics.set_phase_counts(_phases.values())
        await asyncio.sleep(5)


# ------------------------------------------------------------------------------------------ indexes
# Watch-fed, in-memory views of our children, so a reconcile reads no API at all.


@kopf.index("batch", "v1", "jobs", labels=CHILDREN)
def ftj_jobs(namespace: str, labels: Mapping[str, str], body: kopf.Body, **_: Any) -> dict:
    return {(namespace, labels.get(B.LABEL_JOB)): job_view(plain(body))}


@kopf.index("v1", "pods", labels=CHILDREN)
def ftj_pods(namespace: str, labels: Mapping[str, str], body: kopf.Body, **_: Any) -> dict:
    return {(namespace, labels.get(B.LABEL_JOB)): pod_view(plain(body))}


@kopf.index(*FTJ)
def ftj_bodies(namespace: str, name: str, body: kopf.Body, **_: Any) -> dict:
    snapshot = plain(body)
    _phases[(namespace, name)] = (snapshot.get("status") or {}).get("phase")
    return {(namespace, name): snapshot}


def _run(body: Mapping[str, Any], handler: str, ftj_jobs: kopf.Index, ftj_pods: kopf.Index) -> None:
    key = (body["metadata"]["namespace"], body["metadata"]["name"])
    handlers.reconcile(
        plain(body),
        jobs=ftj_jobs.get(key, ()),
        pods=ftj_pods.get(key, ()),
        config=CONFIG,
        handler=handler,
    )


# ----------------------------------------------------------------------------------------- handlers


@kopf.on.event(*FTJ)
def on_event(type: str | None, body: kopf.Body, ftj_jobs: kopf.Index, ftj_pods: kopf.Index, **_: Any) -> None:
    """Every change of a FineTuneJob, and every existing one when the operator starts (type None).

    Level-triggered on purpose: the reconcile reads the whole state each time, so no per-handler
    progress has to be persisted on the object (no annotation patches, no finalizer blocking deletion)
    and an operator killed at any point converges when it starts again."""
    if type == "DELETED":
        meta = body["metadata"]
        # Children carry owner references: the garbage collector removes them.
        _phases.pop((meta["namespace"], meta["name"]), None)
        handlers.forget(meta["uid"])
        return
    _run(body, "event" if type else "startup", ftj_jobs, ftj_pods)


@kopf.timer(*FTJ, interval=CONFIG.resync_seconds, initial_delay=CONFIG.resync_seconds)
def resync(body: kopf.Body, ftj_jobs: kopf.Index, ftj_pods: kopf.Index, **_: Any) -> None:
    """Periodic resync: deadlines, TTLs, progress from the trainer, and a retry of anything that failed."""
    _run(body, "timer", ftj_jobs, ftj_pods)


def _child_event(namespace: str, labels: Mapping[str, str], handler: str, ftj_bodies: kopf.Index,
                 ftj_jobs: kopf.Index, ftj_pods: kopf.Index) -> None:
    key = (namespace, labels.get(B.LABEL_JOB))
    for body in ftj_bodies.get(key, ()):
        handlers.reconcile(body, jobs=ftj_jobs.get(key, ()), pods=ftj_pods.get(key, ()), config=CONFIG, handler=handler)


@kopf.on.event("batch", "v1", "jobs", labels=CHILDREN)
def on_job_event(namespace: str, labels: Mapping[str, str], ftj_bodies: kopf.Index, ftj_jobs: kopf.Index,
                 ftj_pods: kopf.Index, **_: Any) -> None:
    _child_event(namespace, labels, "job-event", ftj_bodies, ftj_jobs, ftj_pods)


@kopf.on.event("v1", "pods", labels=CHILDREN)
def on_pod_event(namespace: str, labels: Mapping[str, str], ftj_bodies: kopf.Index, ftj_jobs: kopf.Index,
                 ftj_pods: kopf.Index, **_: Any) -> None:
    _child_event(namespace, labels, "pod-event", ftj_bodies, ftj_jobs, ftj_pods)
