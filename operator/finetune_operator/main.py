"""Kopf registrations only: every handler delegates to :mod:`finetune_operator.handlers`.

Importing this module registers the handlers with Kopf's default registry.
"""

from __future__ import annotations

import asyncio
import ctypes
import importlib
import logging
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType
from typing import Any

import kopf
from kubernetes import config as k8s_config

from finetune_api.spec import API_GROUP, API_VERSION, PLURAL
from finetune_api.sweep import LABEL_SWEEP, SWEEP_PLURAL
from finetune_operator import handlers, kube, metrics
from finetune_operator.builders import LABEL_JOB, LABEL_MANAGED_BY, MANAGED_BY
from finetune_operator.config import OperatorConfig
from finetune_operator.policy import check_image_patterns, namespace_refusal
from finetune_operator.progress import ProgressReader, check_allowlist, secret_values
from finetune_operator.views import JobView, PodView, job_view, pod_view
from finetune_operator.workqueue import KeyedQueue

CONFIG = OperatorConfig.from_env()
FTJ = (API_GROUP, API_VERSION, PLURAL)
FTS = (API_GROUP, API_VERSION, SWEEP_PLURAL)
CHILDREN = {LABEL_MANAGED_BY: MANAGED_BY}
PREFIX = API_GROUP
IndexKey = tuple[str, str | None]  # (namespace, FineTuneJob name): how the indexes below are keyed
JobIndex = kopf.Index[IndexKey, JobView]
PodIndex = kopf.Index[IndexKey, PodView]
BodyIndex = kopf.Index[IndexKey, dict[str, Any]]

_phases: dict[tuple[str, str], str | None] = {}
log = logging.getLogger(__name__)


def detached_copy(value: Any) -> Any:
    """Copy a Kopf body view into plain dicts/lists that no longer refer to Kopf's (index values
    outlive the event), without metadata.managedFields, which nothing here reads and which is the
    bulk of a status-patched object."""
    if isinstance(value, Mapping):
        return {k: detached_copy(v) for k, v in value.items() if k != "managedFields"}
    if isinstance(value, (list, tuple)):
        return [detached_copy(v) for v in value]
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
    settings.watching.label_selectors["jobs"] = f"{LABEL_MANAGED_BY}={MANAGED_BY}"
    settings.watching.label_selectors["pods"] = f"{LABEL_MANAGED_BY}={MANAGED_BY}"
    try:
        k8s_config.load_incluster_config()
    except k8s_config.ConfigException:
        k8s_config.load_kube_config()
    _install_progress_reader(CONFIG)
    loop = asyncio.get_running_loop()
    loop.create_task(_heartbeat())
    loop.create_task(_resync_loop())


def _install_progress_reader(config: OperatorConfig) -> None:
    """The operator's one progress reader, with the chart's read limits and endpoint allow-list (a bad
    entry stops the operator here, at startup), set before any reconcile asks handlers for one."""
    try:
        check_allowlist(config.allowed_endpoints)
    except ValueError as exc:
        raise kopf.PermanentError(f"FINETUNE_ALLOWED_ENDPOINTS: {exc}") from None
    try:
        check_image_patterns(config.allowed_images)
    except ValueError as exc:
        raise kopf.PermanentError(f"FINETUNE_ALLOWED_IMAGES: {exc}") from None
    handlers._progress_reader = ProgressReader.from_config(config, secret_values(handlers.secret_reader(config.secret_selector)))


def _libc_trim() -> Callable[[int], int] | None:
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
#
# The `type: ignore[arg-type]` on the decorators here and below: Kopf's handler protocols list every
# keyword Kopf may pass, typed for any resource (namespace None when cluster-scoped) and without the
# index keywords (ftj_jobs, ...), so a handler that names only what it uses, typed for our namespaced
# resources, never matches them.


@kopf.index("batch", "v1", "jobs", labels=CHILDREN)  # type: ignore[arg-type]
async def ftj_jobs(namespace: str, labels: Mapping[str, str], body: kopf.Body, **_: Any) -> dict[IndexKey, JobView]:
    return {(namespace, labels.get(LABEL_JOB)): job_view(detached_copy(body))}


@kopf.index("v1", "pods", labels=CHILDREN)  # type: ignore[arg-type]
async def ftj_pods(namespace: str, labels: Mapping[str, str], body: kopf.Body, **_: Any) -> dict[IndexKey, PodView]:
    return {(namespace, labels.get(LABEL_JOB)): pod_view(detached_copy(body))}


@kopf.index(*FTJ)  # type: ignore[arg-type]
async def ftj_bodies(namespace: str, name: str, body: kopf.Body, **_: Any) -> dict[IndexKey, dict[str, Any]]:
    snapshot: dict[str, Any] = detached_copy(body)
    _phases[(namespace, name)] = (snapshot.get("status") or {}).get("phase")
    return {(namespace, name): snapshot}


if CONFIG.namespace_selector:  # namespaceSelector: the labels of every namespace, watch-fed (Kopf fills
    # every index before it calls any handler, so the first reconciles already see them)
    @kopf.index("v1", "namespaces")
    async def ftj_namespaces(name: str, labels: Mapping[str, str], **_: Any) -> dict[str, dict[str, str]]:
        return {name: dict(labels)}


_INDEXES: dict[str, kopf.Index[Any, Any]] = {}
# Reconciles block on the API (sync client); they run in this pool, never on the event loop, at most
# WORKERS at once and one per object, requests for an object that is already waiting joining its run
# (finetune_operator.workqueue). The pool is sized for that: no reconcile waits in it.
WORKERS = 16
_POOL = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="reconcile")
_QUEUE = KeyedQueue(WORKERS)


def _remember(**indexes: kopf.Index[Any, Any] | None) -> None:
    """Keep the index objects (they live as long as the operator) for the resync loop."""
    for name, index in indexes.items():
        if index is not None:
            _INDEXES.setdefault(name, index)


def _snapshot(index: kopf.Index[Any, Any] | None, key: Any) -> list[Any]:
    """Copy an index entry on the event loop (the loop mutates indexes; threads must not iterate them)."""
    return list(index.get(key, ())) if index is not None else []


async def _reconcile(body: Mapping[str, Any], handler: str) -> None:
    """Reconcile the FineTuneJob ``body`` names, on what the indexes hold when the reconcile starts (the
    newest body, its children): requests that come while it waits for a slot are served by it."""
    key = (body["metadata"]["namespace"], body["metadata"]["name"])

    async def work() -> None:
        bodies = _INDEXES.get("bodies")
        found = _snapshot(bodies, key) if bodies is not None else [body]
        if not found:  # deleted while it waited: the DELETED event did what there was to do
            return
        snapshot: dict[str, Any] = detached_copy(found[0])
        jobs, pods = _snapshot(_INDEXES.get("jobs"), key), _snapshot(_INDEXES.get("pods"), key)
        labels = _snapshot(_INDEXES.get("namespaces"), key[0]) if CONFIG.namespace_selector else []
        ns_labels = labels[0] if labels else None
        await asyncio.get_running_loop().run_in_executor(
            _POOL, lambda: handlers.reconcile(snapshot, jobs=jobs, pods=pods, config=CONFIG, handler=handler, namespace_labels=ns_labels)
        )

    await _QUEUE.run(("job", *key), work)


# ----------------------------------------------------------------------------------------- handlers


@kopf.on.event(*FTJ)  # type: ignore[arg-type]
async def on_event(type: str | None, body: kopf.Body, ftj_jobs: JobIndex, ftj_pods: PodIndex, ftj_bodies: BodyIndex, **_: Any) -> None:
    """Every change of a FineTuneJob, and every existing one when the operator starts (type None).

    Level-triggered on purpose: the reconcile reads the whole state each time, so no per-handler
    progress has to be persisted on the object (no annotation patches, no finalizer blocking deletion)
    and an operator killed at any point converges when it starts again."""
    _remember(bodies=ftj_bodies, jobs=ftj_jobs, pods=ftj_pods, namespaces=_.get("ftj_namespaces"))
    if type == "DELETED":
        meta = body["metadata"]
        # Children carry owner references: the garbage collector removes them.
        _phases.pop((meta["namespace"], meta["name"]), None)
        handlers.forget(meta["uid"])
        return
    await _reconcile(body, "event" if type else "startup")


async def _child_event(namespace: str, labels: Mapping[str, str], handler: str, **indexes: kopf.Index[IndexKey, Any]) -> None:
    _remember(**indexes)
    for body in _snapshot(indexes["bodies"], (namespace, labels.get(LABEL_JOB))):
        await _reconcile(body, handler)


@kopf.on.event("batch", "v1", "jobs", labels=CHILDREN)  # type: ignore[arg-type]
async def on_job_event(namespace: str, labels: Mapping[str, str], ftj_bodies: BodyIndex, ftj_jobs: JobIndex,
                       ftj_pods: PodIndex, **_: Any) -> None:
    await _child_event(namespace, labels, "job-event", bodies=ftj_bodies, jobs=ftj_jobs, pods=ftj_pods)


@kopf.on.event("v1", "pods", labels=CHILDREN)  # type: ignore[arg-type]
async def on_pod_event(namespace: str, labels: Mapping[str, str], ftj_bodies: BodyIndex, ftj_jobs: JobIndex,
                       ftj_pods: PodIndex, **_: Any) -> None:
    await _child_event(namespace, labels, "pod-event", bodies=ftj_bodies, jobs=ftj_jobs, pods=ftj_pods)


_resyncing: set[IndexKey] = set()  # jobs whose resync is still running
_resync_tasks: set[asyncio.Task[None]] = set()  # strong references, so no task is collected mid-run


async def _resync_job(key: IndexKey, bodies: list[dict[str, Any]]) -> None:
    try:
        for body in bodies:
            await _reconcile(body, "resync")
    except Exception as exc:  # counted in the metrics; the next round retries
        log.warning("resync of %s/%s failed: %s", key[0], key[1], exc)
    finally:
        _resyncing.discard(key)


def resync_round(keys: list[IndexKey], snapshot: Callable[[IndexKey], list[dict[str, Any]]]) -> int:
    """Start one resync per job, concurrently (the reconcile queue bounds how many run at once), and
    return how many started. A job whose previous resync is still running is skipped, so one slow
    job (a stuck endpoint, a slow API call) never delays another's deadline, TTL or progress, and
    never piles up queued reconciles of its own."""
    loop = asyncio.get_running_loop()
    started = 0
    for key in keys:
        if key in _resyncing:
            continue
        bodies = snapshot(key)
        if not bodies:
            continue
        _resyncing.add(key)
        task = loop.create_task(_resync_job(key, bodies))
        _resync_tasks.add(task)
        task.add_done_callback(_resync_tasks.discard)
        started += 1
    return started


async def _resync_loop() -> None:
    """Periodic resync of every FineTuneJob: deadlines, TTLs, progress from the trainer, and a retry of
    anything that failed. One loop for all jobs instead of a Kopf timer per object: at 500 jobs the
    per-object timer tasks cost more memory than everything else the operator holds. The loop never
    awaits a reconcile: each round starts them (:func:`resync_round`) and sleeps."""
    while True:
        await asyncio.sleep(CONFIG.resync_seconds)
        bodies = _INDEXES.get("bodies")
        if bodies is None:
            continue
        resync_round(list(bodies), lambda key: _snapshot(bodies, key))


# ------------------------------------------------------------------------------------------- sweeps


_sweep_phases: dict[tuple[str, str], str | None] = {}  # every FineTuneSweep seen, for the sweep resync


def _sweeps() -> ModuleType:
    """:mod:`finetune_operator.sweep_handlers`, imported when the first sweep is reconciled: it brings
    optuna (and numpy), some 36 MB of RSS that an operator which never sees a sweep does without."""
    return importlib.import_module("finetune_operator.sweep_handlers")


async def _reconcile_sweep(namespace: str, name: str) -> None:
    refused = None
    if CONFIG.namespace_selector:  # a sweep creates FineTuneJobs: it serves the namespaces the jobs serve
        found = _snapshot(_INDEXES.get("namespaces"), namespace)
        refused = namespace_refusal(namespace, found[0] if found else None, CONFIG.namespace_selector)
    await _QUEUE.run(("sweep", namespace, name), lambda: asyncio.get_running_loop().run_in_executor(
        _POOL, lambda: _sweeps().reconcile_sweep(namespace, name, CONFIG.instance, refused)
    ))


@kopf.on.event(*FTS)  # type: ignore[arg-type]
async def on_sweep_event(type: str | None, namespace: str, name: str, body: kopf.Body, **_: Any) -> None:
    """Every change of a FineTuneSweep, and every existing one at startup: level-triggered like the jobs."""
    _remember(namespaces=_.get("ftj_namespaces"))
    if type == "DELETED":  # its trials carry owner references: the garbage collector removes them
        _sweep_phases.pop((namespace, name), None)
        _sweeps().forget(body["metadata"]["uid"], namespace, name)
        return
    _sweep_phases[(namespace, name)] = (body.get("status") or {}).get("phase")
    if _sweep_resync_task is None:
        _start_sweep_resync()
    await _reconcile_sweep(namespace, name)


_sweep_resync_task: asyncio.Task[None] | None = None


def _start_sweep_resync() -> None:
    global _sweep_resync_task
    _sweep_resync_task = asyncio.get_running_loop().create_task(_sweep_resync_loop())


async def _sweep_resync_loop() -> None:
    """Reconcile every unfinished sweep now and then, so a failed reconcile (an API error) is retried even
    when no trial changes; sweeps are few, one at a time is enough."""
    while True:
        await asyncio.sleep(CONFIG.resync_seconds)
        for (namespace, name), phase in list(_sweep_phases.items()):
            if phase in ("Succeeded", "Failed"):
                continue
            try:
                await _reconcile_sweep(namespace, name)
            except Exception as exc:  # counted in the metrics; the next round retries
                log.warning("resync of sweep %s/%s failed: %s", namespace, name, exc)


@kopf.on.event(*FTJ, labels={LABEL_SWEEP: kopf.PRESENT})  # type: ignore[arg-type]
async def on_trial_event(type: str | None, namespace: str, labels: Mapping[str, str], **_: Any) -> None:
    """A trial FineTuneJob changed (phase, progress, checkpoints): its sweep decides again."""
    await _reconcile_sweep(namespace, labels[LABEL_SWEEP])
