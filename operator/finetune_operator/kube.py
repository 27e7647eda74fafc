"""Thin wrappers over the Kubernetes API calls the operator makes: exactly the verbs in the chart's RBAC."""

from __future__ import annotations

import logging
import threading
from datetime import datetime, timezone
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from finetune_api.spec import API_GROUP, API_VERSION, KIND, PLURAL

log = logging.getLogger(__name__)


class Conflict(Exception):
    """The FineTuneJob changed since it was read (resourceVersion precondition failed)."""


_api: client.ApiClient | None = None
_api_lock = threading.Lock()


def api_client() -> client.ApiClient:
    """One shared client (thread-safe connection pool): a new ApiClient per call would mean a new TLS
    context and handshake per request, which costs both latency and memory at scale."""
    global _api
    with _api_lock:
        if _api is None:
            cfg = client.Configuration.get_default_copy()
            cfg.connection_pool_maxsize = 16
            _api = client.ApiClient(cfg)
        return _api


def _core() -> client.CoreV1Api:
    return client.CoreV1Api(api_client())


def _batch() -> client.BatchV1Api:
    return client.BatchV1Api(api_client())


def _networking() -> client.NetworkingV1Api:
    return client.NetworkingV1Api(api_client())


def _custom() -> client.CustomObjectsApi:
    return client.CustomObjectsApi(api_client())


def create_if_absent(obj: dict[str, Any]) -> bool:
    """Create a child; 409 AlreadyExists means an earlier (maybe interrupted) reconcile made it. Returns
    True when this call created it."""
    kind, ns = obj["kind"], obj["metadata"]["namespace"]
    create = {
        "Service": _core().create_namespaced_service,
        "ConfigMap": _core().create_namespaced_config_map,
        "Job": _batch().create_namespaced_job,
        "NetworkPolicy": _networking().create_namespaced_network_policy,
    }[kind]
    try:
        create(ns, obj)
        return True
    except ApiException as exc:
        if exc.status == 409:
            log.debug("%s %s/%s already exists", kind, ns, obj["metadata"]["name"])
            return False
        raise


def delete_job(namespace: str, name: str) -> None:
    """Foreground deletion: the Job object stays until its pods are gone, so the next attempt is only
    created after the old pods had their grace period to checkpoint."""
    try:
        _batch().delete_namespaced_job(name, namespace, body=client.V1DeleteOptions(propagation_policy="Foreground"))
    except ApiException as exc:
        if exc.status != 404:
            raise


def set_job_suspend(namespace: str, name: str, suspend: bool) -> None:
    _batch().patch_namespaced_job(name, namespace, {"spec": {"suspend": suspend}})


def secret_keys(namespace: str, name: str) -> set[str] | None:
    """The key names of a Secret (never its values), or None when it does not exist."""
    try:
        secret = _core().read_namespaced_secret(name, namespace)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise
    return set((secret.data or {}).keys()) | set((secret.string_data or {}).keys())


def read_secret(namespace: str, name: str) -> client.V1Secret | None:
    """The Secret object, or None. Callers keep its values in memory only."""
    try:
        return _core().read_namespaced_secret(name, namespace)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def get_finetunejob(namespace: str, name: str) -> dict[str, Any] | None:
    try:
        found: dict[str, Any] = _custom().get_namespaced_custom_object(API_GROUP, API_VERSION, namespace, PLURAL, name)
        return found
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def patch_status(namespace: str, name: str, status: dict[str, Any], resource_version: str | None) -> dict[str, Any]:
    """Merge-patch the status subresource, guarded by resourceVersion so a stale view never wins."""
    body: dict[str, Any] = {"status": status}
    if resource_version:
        body["metadata"] = {"resourceVersion": resource_version}
    try:
        patched: dict[str, Any] = _custom().patch_namespaced_custom_object_status(API_GROUP, API_VERSION, namespace, PLURAL, name, body)
        return patched
    except ApiException as exc:
        if exc.status == 409:
            raise Conflict(f"{namespace}/{name} changed since it was read") from exc
        raise


def delete_finetunejob(namespace: str, name: str) -> None:
    try:
        _custom().delete_namespaced_custom_object(
            API_GROUP, API_VERSION, namespace, PLURAL, name, body=client.V1DeleteOptions(propagation_policy="Background")
        )
    except ApiException as exc:
        if exc.status != 404:
            raise


def post_event(body: dict[str, Any], event_type: str, reason: str, message: str, *, instance: str) -> None:
    """A core/v1 Event on the FineTuneJob (what `kubectl describe ftj` shows); ``instance`` is the
    reporting operator (its pod's name)."""
    meta = body["metadata"]
    now = datetime.now(timezone.utc)
    event = {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
        "involvedObject": {
            "apiVersion": f"{API_GROUP}/{API_VERSION}",
            "kind": KIND,
            "name": meta["name"],
            "namespace": meta["namespace"],
            "uid": meta["uid"],
            "resourceVersion": meta.get("resourceVersion"),
        },
        "type": event_type,
        "reason": reason,
        "message": message[:1024],
        "source": {"component": "finetune-operator"},
        "reportingComponent": "finetune-operator",
        "reportingInstance": instance,
        "firstTimestamp": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "lastTimestamp": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "count": 1,
    }
    try:
        _core().create_namespaced_event(meta["namespace"], event)
    except ApiException as exc:  # an event is advisory: never fail a reconcile over it
        log.warning("could not post event %s on %s/%s: %s", reason, meta["namespace"], meta["name"], exc.reason)
