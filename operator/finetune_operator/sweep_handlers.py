"""FineTuneSweep reconcile: read the sweep's trials, let :func:`finetune_operator.sweep.decide` plan, apply the plan.

The I/O only: list the trial FineTuneJobs (label ``finetune.io/sweep=<name>``), create the new ones,
suspend the pruned ones, write the status and post one Event per trial decision. Called by
:mod:`finetune_operator.main` on every change of a sweep and of any of its trials.
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime, timezone
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from finetune_api.spec import API_GROUP, API_VERSION, PLURAL
from finetune_api.sweep import LABEL_SWEEP, SWEEP_KIND, SWEEP_PLURAL, SweepPhase, TrialState, parse_sweep
from finetune_api.validation import validation_message
from finetune_operator import kube, metrics
from finetune_operator.sweep import Event, decide, observe_final, observe_trial

log = logging.getLogger(__name__)
_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


def _lock(uid: str) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(uid, threading.Lock())


def forget(uid: str, namespace: str | None = None, name: str | None = None) -> None:
    """A deleted sweep: drop its lock and its metric series."""
    with _locks_guard:
        _locks.pop(uid, None)
        metric = _best_metric.pop((namespace or "", name or ""), None)
    if namespace and name:
        for state in TrialState:
            try:
                metrics.SWEEP_TRIALS.remove(namespace, name, state.value)
            except KeyError:
                pass
        if metric is not None:
            try:
                metrics.SWEEP_BEST.remove(namespace, name, metric)
            except KeyError:
                pass


_best_metric: dict[tuple[str, str], str] = {}  # (namespace, sweep) -> the metric label of its best-value series


def record_metrics(namespace: str, name: str, metric: str, status: dict[str, Any]) -> None:
    """The sweep's trial counts and best value as Prometheus gauges (one series per sweep and state)."""
    counts = {TrialState.running.value: "running", TrialState.complete.value: "completed",
              TrialState.pruned.value: "pruned", TrialState.failed.value: "failed"}
    for state, key in counts.items():
        metrics.SWEEP_TRIALS.labels(namespace, name, state).set(status.get(key) or 0)
    if status.get("bestValue") is not None:
        metrics.SWEEP_BEST.labels(namespace, name, metric).set(status["bestValue"])
        with _locks_guard:
            _best_metric[(namespace, name)] = metric


def _api() -> client.CustomObjectsApi:
    return client.CustomObjectsApi(kube.api_client())


def list_trials(namespace: str, sweep: str) -> list[dict[str, Any]]:
    found = _api().list_namespaced_custom_object(API_GROUP, API_VERSION, namespace, PLURAL, label_selector=f"{LABEL_SWEEP}={sweep}")
    return list(found.get("items") or [])


def _owned(child: dict[str, Any], sweep_uid: str) -> bool:
    """Only this sweep's own children count: a FineTuneJob anyone labels finetune.io/sweep=<name> is not a trial."""
    return any(o.get("uid") == sweep_uid for o in (child.get("metadata") or {}).get("ownerReferences") or ())


def create_trial(body: dict[str, Any], sweep_uid: str) -> bool:
    """Create a trial FineTuneJob; True when this call created it. 409 is fine when this sweep owns what is there."""
    meta = body["metadata"]
    try:
        _api().create_namespaced_custom_object(API_GROUP, API_VERSION, meta["namespace"], PLURAL, body)
        return True
    except ApiException as exc:
        if exc.status != 409:
            raise
    existing = kube.get_finetunejob(meta["namespace"], meta["name"]) or {}
    owners = [o.get("uid") for o in (existing.get("metadata") or {}).get("ownerReferences") or ()]
    if sweep_uid not in owners:
        raise kube.ForeignChild(f"FineTuneJob {meta['namespace']}/{meta['name']} exists and is not this sweep's trial")
    log.debug("trial %s/%s already exists", meta["namespace"], meta["name"])
    return False


def suspend_trial(namespace: str, name: str) -> None:
    """Prune: stop the trial's pods (the trainer checkpoints on SIGTERM), keep the job."""
    try:
        _api().patch_namespaced_custom_object(API_GROUP, API_VERSION, namespace, PLURAL, name, {"spec": {"runPolicy": {"suspend": True}}})
    except ApiException as exc:
        if exc.status != 404:
            raise


def patch_sweep_status(namespace: str, name: str, status: dict[str, Any]) -> None:
    _api().patch_namespaced_custom_object_status(API_GROUP, API_VERSION, namespace, SWEEP_PLURAL, name, {"status": status})


def post_sweep_event(body: dict[str, Any], event: Event, instance: str) -> None:
    meta = body["metadata"]
    now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    obj = {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
        "involvedObject": {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": SWEEP_KIND, "name": meta["name"],
                           "namespace": meta["namespace"], "uid": meta["uid"]},
        "type": event.type,
        "reason": event.reason,
        "message": event.message[:1024],
        "source": {"component": "finetune-operator"},
        "reportingComponent": "finetune-operator",
        "reportingInstance": instance,
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    }
    try:
        client.CoreV1Api(kube.api_client()).create_namespaced_event(meta["namespace"], obj)
    except ApiException as exc:  # advisory: never fail a reconcile over an Event
        log.warning("could not post event %s on sweep %s/%s: %s", event.reason, meta["namespace"], meta["name"], exc.reason)


def reconcile_sweep(namespace: str, name: str, instance: str, refused: str | None = None) -> None:
    """Reconcile one sweep from a fresh read (an event's body may predate the status this operator last wrote).
    ``refused``: why the operator does not serve this namespace (namespaceSelector), or None."""
    try:
        body = _api().get_namespaced_custom_object(API_GROUP, API_VERSION, namespace, SWEEP_PLURAL, name)
    except ApiException as exc:
        if exc.status == 404:
            return
        raise
    metrics.RECONCILES.labels("sweep").inc()
    with _lock(body["metadata"]["uid"]), metrics.DURATION.labels("sweep").time():
        try:
            _reconcile(body, instance, refused)
        except Exception:  # the next change of the sweep or of a trial retries (level-triggered)
            metrics.ERRORS.labels("sweep").inc()
            raise


def _reconcile(body: dict[str, Any], instance: str, refused: str | None = None) -> None:
    meta = body["metadata"]
    namespace, name, uid = meta["namespace"], meta["name"], meta["uid"]
    old_status = body.get("status") or {}
    try:
        spec = parse_sweep(body.get("spec") or {})
    except ValidationError as err:
        status = {"phase": SweepPhase.failed.value, "message": f"InvalidSpec: {validation_message(err)}", "observedGeneration": meta.get("generation")}
        if {k: old_status.get(k) for k in status} != status:
            patch_sweep_status(namespace, name, status)
            post_sweep_event(body, Event("Warning", "InvalidSpec", status["message"]), instance)
        return
    children = [c for c in list_trials(namespace, name) if _owned(c, uid)]
    trials = [t for t in (observe_trial(c) for c in children) if t is not None]
    final = next((f for f in (observe_final(c) for c in children) if f is not None), None)
    plan = decide(name, namespace, uid, spec, old_status, trials, meta.get("generation"), final=final, refused=refused)
    for child in plan.create:
        create_trial(child, uid)
    for trial in plan.suspend:
        suspend_trial(namespace, trial)
    if {k: old_status.get(k) for k in plan.status} != plan.status:
        patch_sweep_status(namespace, name, plan.status)
    record_metrics(namespace, name, spec.objective.metric, plan.status)
    for event in plan.events:
        post_sweep_event(body, event, instance)
    if plan.status["phase"] != old_status.get("phase") and plan.status["phase"] == SweepPhase.pending.value:
        post_sweep_event(body, Event("Warning", "NamespaceNotServed", plan.status["message"]), instance)
    elif plan.status["phase"] != old_status.get("phase") and plan.status["phase"] != SweepPhase.running.value:
        kind = "Normal" if plan.status["phase"] == SweepPhase.succeeded.value else "Warning"
        post_sweep_event(body, Event(kind, f"Sweep{plan.status['phase']}", plan.status["message"]), instance)
