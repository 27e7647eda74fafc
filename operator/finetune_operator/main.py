"""Kopf registrations only: every handler delegates to :mod:`finetune_operator.handlers`.

Importing this module registers the handlers with Kopf's default registry.
"""

from __future__ import annotations

import asyncio
import ctypes
from concurrent.futures import ThreadPoolExecutor
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
    """Detach a Kopf body view into plain dicts/lists (index values outlive the event), without
    metadata.managedFields, which nothing here reads and which is the bulk of a status-patched object."""
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items() if k != "managedFields"}
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
    try:
        k8s_config.load_incluster_config()
    except k8s_config.ConfigException:
        k8s_config.load_kube_config()
    loop = asyncio.get_running_loop()
    loop.create_task(_heartbeat())
    loop.create_task(_resync_loop())


def _libc_trim() -> Any:
    """glibc keeps freed heap pages mapped after a burst of events (hundreds of objects decoded at
    once); malloc_trim(0) hands them back, so RSS follows what is actually in use."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


async def _heartbeat() -> None:
    trim = _libc_trim()
    while True:
        metrics.HEARTBEAT.beat()
        metrics.set_phase_counts(_phases.values())
        if trim is not None:
            trim(0)
        await asyncio.sleep(5)


# ------------------------------------------------------------------------------------------ indexes
# Watch-fed, in-memory views of our children, so a reconcile reads no API at all.


@kopf.index("batch", "v1", "jobs", labels=CHILDREN)
async def ftj_jobs(namespace: str, labels: Mapping[str, str], body: kopf.Body, **_: Any) -> dict:
    return {(namespace, labels.get(B.LABEL_JOB)): job_view(plain(body))}


@kopf.index("v1", "pods", labels=CHILDREN)
async def ftj_pods(namespace: str, labels: Mapping[str, str], body: kopf.Body, **_: Any) -> dict:
    return {(namespace, labels.get(B.LABEL_JOB)): pod_view(plain(body))}


@kopf.index(*FTJ)
async def ftj_bodies(namespace: str, name: str, body: kopf.Body, **_: Any) -> dict:
    snapshot = plain(body)
    _phases[(namespace, name)] = (snapshot.get("status") or {}).get("phase")
    return {(namespace, name): snapshot}


_INDEXES: dict[str, kopf.Index] = {}
# Reconciles block on the API (sync client); they run here, never on the event loop.
_POOL = ThreadPoolExecutor(max_workers=8, thread_name_prefix="reconcile")


def _remember(**indexes: kopf.Index) -> None:
    """Keep the index objects (they live as long as the operator) for the resync loop."""
    for name, index in indexes.items():
        _INDEXES.setdefault(name, index)


def _snapshot(index: kopf.Index | None, key: tuple) -> list:
    """Copy an index entry on the event loop (the loop mutates indexes; threads must not iterate them)."""
    return list(index.get(key, ())) if index is not None else []


async def _reconcile(body: Mapping[str, Any], handler: str) -> None:
    key = (body["metadata"]["namespace"], body["metadata"]["name"])
    jobs, pods = _snapshot(_INDEXES.get("jobs"), key), _snapshot(_INDEXES.get("pods"), key)
    snapshot = plain(body)
    await asyncio.get_running_loop().run_in_executor(
        _POOL, lambda: handlers.reconcile(snapshot, jobs=jobs, pods=pods, config=CONFIG, handler=handler)
    )


# ----------------------------------------------------------------------------------------- handlers


@kopf.on.event(*FTJ)
async def on_event(type: str | None, body: kopf.Body, ftj_jobs: kopf.Index, ftj_pods: kopf.Index, ftj_bodies: kopf.Index, **_: Any) -> None:
    """Every change of a FineTuneJob, and every existing one when the operator starts (type None).

    Level-triggered on purpose: the reconcile reads the whole state each time, so no per-handler
    progress has to be persisted on the object (no annotation patches, no finalizer blocking deletion)
    and an operator killed at any point converges when it starts again."""
    _remember(bodies=ftj_bodies, jobs=ftj_jobs, pods=ftj_pods)
    if type == "DELETED":
        meta = body["metadata"]
        # Children carry owner references: the garbage collector removes them.
        _phases.pop((meta["namespace"], meta["name"]), None)
        handlers.forget(meta["uid"])
        return
    await _reconcile(body, "event" if type else "startup")


async def _child_event(namespace: str, labels: Mapping[str, str], handler: str, **indexes: kopf.Index) -> None:
    _remember(**indexes)
    for body in _snapshot(indexes["bodies"], (namespace, labels.get(B.LABEL_JOB))):
        await _reconcile(body, handler)


@kopf.on.event("batch", "v1", "jobs", labels=CHILDREN)
async def on_job_event(namespace: str, labels: Mapping[str, str], ftj_bodies: kopf.Index, ftj_jobs: kopf.Index,
                       ftj_pods: kopf.Index, **_: Any) -> None:
    await _child_event(namespace, labels, "job-event", bodies=ftj_bodies, jobs=ftj_jobs, pods=ftj_pods)


@kopf.on.event("v1", "pods", labels=CHILDREN)
async def on_pod_event(namespace: str, labels: Mapping[str, str], ftj_bodies: kopf.Index, ftj_jobs: kopf.Index,
                       ftj_pods: kopf.Index, **_: Any) -> None:
    await _child_event(namespace, labels, "pod-event", bodies=ftj_bodies, jobs=ftj_jobs, pods=ftj_pods)


async def _resync_loop() -> None:
    """Periodic resync of every FineTuneJob: deadlines, TTLs, progress from the trainer, and a retry of
    anything that failed. One loop for all jobs instead of a Kopf timer per object: at 500 jobs the
    per-object timer tasks cost more memory than everything else the operator holds."""
    while True:
        await asyncio.sleep(CONFIG.resync_seconds)
        bodies = _INDEXES.get("bodies")
        if bodies is None:
            continue
        for key in list(bodies):
            for body in _snapshot(bodies, key):
                try:
                    await _reconcile(body, "resync")
                except Exception as exc:  # counted in the metrics; the next round retries
                    log.warning("resync of %s/%s failed: %s", key[0], key[1], exc)
