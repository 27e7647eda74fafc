"""Handlers: read what the cluster holds, ask the pure state machine what to do, do it.

Every entry point (create, resume, update, timer, child Job/pod events) ends in :func:`reconcile`,
which is level-based and idempotent. A per-object lock keeps two entry points from acting on the same
FineTuneJob at once; a resourceVersion precondition on the status write keeps a stale view from
winning, in which case the object is re-read and the reconcile runs again.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import defaultdict
from typing import Any, Iterable, Mapping

from pydantic import ValidationError

from finetune_api.spec import FineTuneJobSpec
from finetune_api.status import TERMINAL_PHASES, Phase
from finetune_api.validation import validation_message
from finetune_operator import builders as B
from finetune_operator import kube, metrics
from finetune_operator.progress import ProgressReader, project, secret_values
from finetune_operator.config import OperatorConfig
from finetune_operator.state import JobView, Observed, PodView, decide

log = logging.getLogger(__name__)

_locks: dict[str, threading.Lock] = defaultdict(threading.Lock)
_locks_guard = threading.Lock()


def _lock(uid: str) -> threading.Lock:
    with _locks_guard:
        return _locks[uid]


def forget(uid: str) -> None:
    with _locks_guard:
        _locks.pop(uid, None)
    _reader().forget(uid)


_progress_reader: ProgressReader | None = None


def _reader() -> ProgressReader:
    global _progress_reader
    if _progress_reader is None:
        _progress_reader = ProgressReader(secret_values(kube.read_secret), interval=float(os.environ.get("FINETUNE_PROGRESS_INTERVAL", "15")))
    return _progress_reader


def spec_error(err: ValidationError) -> str:
    """The trainer's words for the same problem (finetune_api.validation)."""
    return validation_message(err)


def parse(body: Mapping[str, Any]) -> tuple[FineTuneJobSpec | None, str | None]:
    try:
        return FineTuneJobSpec.model_validate(dict(body.get("spec") or {})), None
    except ValidationError as err:
        return None, spec_error(err)


def check_secret(namespace: str, spec: FineTuneJobSpec) -> tuple[str, str] | None:
    ref = spec.storage.credentials_secret
    if ref is None:
        return None
    keys = kube.secret_keys(namespace, ref.name)
    if keys is None:
        return (
            "SecretNotFound",
            f"storage.credentialsSecret {ref.name!r} does not exist in namespace {namespace}: create it with keys "
            f"{', '.join(B.CREDENTIAL_KEYS)} (kubectl create secret generic {ref.name} --from-literal=AWS_ACCESS_KEY_ID=... "
            f"--from-literal=AWS_SECRET_ACCESS_KEY=...), then re-create this FineTuneJob",
        )
    missing = [k for k in B.CREDENTIAL_KEYS if k not in keys]
    if missing:
        return (
            "SecretMissingKeys",
            f"storage.credentialsSecret {ref.name!r} lacks key(s) {', '.join(missing)}; it must hold "
            f"{', '.join(B.CREDENTIAL_KEYS)} (and optionally AWS_SESSION_TOKEN)",
        )
    return None


def _owner(body: Mapping[str, Any]) -> B.Owner:
    meta = body["metadata"]
    return B.Owner(name=meta["name"], namespace=meta["namespace"], uid=meta["uid"], generation=int(meta.get("generation") or 1))


def _status_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """A merge patch turning old into new (keys that disappeared are nulled)."""
    patch = {k: v for k, v in new.items() if old.get(k) != v}
    for k in old:
        if k not in new:
            patch[k] = None
    return patch


def reconcile(
    body: Mapping[str, Any],
    *,
    jobs: Iterable[JobView],
    pods: Iterable[PodView],
    config: OperatorConfig,
    handler: str,
) -> None:
    """Drive one FineTuneJob one step towards its desired state."""
    meta = body["metadata"]
    uid = meta["uid"]
    with _lock(uid), metrics.DURATION.labels(handler).time():
        metrics.RECONCILES.labels(handler).inc()
        try:
            _reconcile_locked(dict(body), list(jobs), list(pods), config)
        except Exception:
            metrics.ERRORS.labels(handler).inc()
            raise


def _reconcile_locked(body: dict[str, Any], jobs: list[JobView], pods: list[PodView], config: OperatorConfig) -> None:
    for _ in range(3):
        if body["metadata"].get("deletionTimestamp"):
            return
        spec, error = parse(body)
        meta = body["metadata"]
        status = body.get("status") or {}
        active = status.get("jobName") and status.get("phase") not in TERMINAL_PHASES
        progress = _reader().read(meta["uid"], meta["namespace"], spec) if spec is not None and active else None
        observed = Observed(
            name=meta["name"],
            namespace=meta["namespace"],
            generation=int(meta.get("generation") or 1),
            status=dict(body.get("status") or {}),
            spec=spec,
            spec_error=error,
            jobs=tuple(jobs),
            pods=tuple(pods),
            progress=progress,
        )
        plan = decide(observed)
        if spec is not None and active and plan.phase in TERMINAL_PHASES:
            final = _reader().read(meta["uid"], meta["namespace"], spec, force=True)  # the last word of the trainer
            if final is not None:
                plan.status.update(project(final))
        if plan.create_job is not None and spec is not None:
            problem = check_secret(meta["namespace"], spec)
            if problem:
                plan = decide(Observed(**{**observed.__dict__, "secret_problem": problem}))
        try:
            _apply(body, spec, plan, config)
            return
        except kube.Conflict:
            fresh = kube.get_finetunejob(meta["namespace"], meta["name"])
            if fresh is None:
                return
            body = fresh
    raise kube.Conflict(f"{body['metadata']['namespace']}/{body['metadata']['name']} kept changing under the reconcile; the next event or resync retries")


def _apply(body: dict[str, Any], spec: FineTuneJobSpec | None, plan: Any, config: OperatorConfig) -> None:
    meta = body["metadata"]
    ns, name = meta["namespace"], meta["name"]
    old_status = dict(body.get("status") or {})
    patch = _status_patch(old_status, plan.status)
    if patch:
        kube.patch_status(ns, name, patch, meta.get("resourceVersion"))
        if plan.status.get("phase") != old_status.get("phase"):
            metrics.TRANSITIONS.labels(plan.status.get("phase") or "").inc()
        if int(plan.status.get("restarts") or 0) > int(old_status.get("restarts") or 0):
            metrics.RESTARTS.inc()
    for event_type, reason, message in plan.events:
        kube.post_event(body, event_type, reason, message)
        log.info("%s/%s: %s: %s", ns, name, reason, message)
    for job_name in plan.delete_jobs:
        kube.delete_job(ns, job_name)
    for job_name, suspend in plan.set_suspend.items():
        kube.set_job_suspend(ns, job_name, suspend)
    if plan.create_job is not None and spec is not None and plan.status.get("phase") != Phase.failed.value:
        owner = _owner(body)
        kube.create_if_absent(B.build_service(owner))
        kube.create_if_absent(B.build_config_map(owner, spec))
        kube.create_if_absent(B.build_job(owner, spec, plan.create_job, config.defaults))
    if plan.delete_self:
        kube.delete_finetunejob(ns, name)
