"""Thin wrappers over the Kubernetes API calls the operator makes: exactly the verbs in the chart's RBAC."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any, TypeVar

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from finetune_api.spec import API_GROUP, API_VERSION, KIND, PLURAL
from finetune_operator.views import foreign_owner

T = TypeVar("T")

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
            cfg.connection_pool_maxsize = 24  # the reconcile workers (main.WORKERS) and the progress reader's
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


class Rejected(Exception):
    """The API server refused to create a child (400/413/422: invalid, too long, too large); retrying
    the same object cannot help."""

    def __init__(self, kind: str, name: str, message: str):
        super().__init__(f"the API server rejected {kind} {name}: {message}")
        self.kind, self.name, self.server_message = kind, name, message


class SecretForbidden(Exception):
    """The API server refused the operator a Secret (403): its RBAC does not cover that namespace."""


class ForeignChild(Exception):
    """A child's name is taken by an object this FineTuneJob does not control."""


REJECTED_STATUSES = (400, 413, 422)


def server_message(exc: ApiException) -> str:
    """The ``message`` of the API server's Status body (what kubectl prints), else the HTTP reason."""
    try:
        message = json.loads(exc.body or "{}").get("message")
    except (ValueError, AttributeError):
        message = None
    return str(message or exc.reason or f"HTTP {exc.status}")[:2048]


_READ = {
    "Service": lambda name, ns: _core().read_namespaced_service(name, ns),
    "ConfigMap": lambda name, ns: _core().read_namespaced_config_map(name, ns),
    "Job": lambda name, ns: _batch().read_namespaced_job(name, ns),
    "NetworkPolicy": lambda name, ns: _networking().read_namespaced_network_policy(name, ns),
}


def read_meta(kind: str, namespace: str, name: str) -> dict[str, Any] | None:
    """The metadata (camelCase, as the API serves it) of a child, or None when there is none."""
    try:
        obj = _READ[kind](name, namespace)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise
    meta: dict[str, Any] = api_client().sanitize_for_serialization(obj.metadata)
    return meta


def create_owned(obj: dict[str, Any], uid: str) -> bool:
    """Create a child; True when this call created it. 409 AlreadyExists is fine only when ``uid``
    (the FineTuneJob) controls what is there (an earlier, maybe interrupted, reconcile made it), else
    :class:`ForeignChild`. A refusal of the object itself raises :class:`Rejected`."""
    kind, ns, name = obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"]
    create = {
        "Service": _core().create_namespaced_service,
        "ConfigMap": _core().create_namespaced_config_map,
        "Job": _batch().create_namespaced_job,
        "NetworkPolicy": _networking().create_namespaced_network_policy,
    }[kind]
    try:
        _drain(create(ns, obj, _preload_content=False))  # nothing reads the answer: no client models built from it
        return True
    except ApiException as exc:
        if exc.status in REJECTED_STATUSES:
            raise Rejected(kind, name, server_message(exc)) from exc
        if exc.status != 409:
            raise
    existing = read_meta(kind, ns, name)
    who = foreign_owner(existing, uid) if existing is not None else "deleted while it was being created"
    if who:
        raise ForeignChild(f"{kind} {ns}/{name} exists and is {who}")
    log.debug("%s %s/%s already exists", kind, ns, name)
    return False


def _drain(response: Any) -> None:
    """Read an unparsed answer (``_preload_content=False``) to its end, so its connection goes back to the pool."""
    response.data  # noqa: B018 - reading the property consumes the body


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
    """The key names of a Secret (never its values), or None when it does not exist; 403 raises
    :class:`SecretForbidden`."""
    secret = _read_secret(lambda: _core().read_namespaced_secret(name, namespace))
    if secret is None:
        return None
    return set((secret.data or {}).keys()) | set((secret.string_data or {}).keys())


def _read_secret(read: Callable[[], T]) -> T | None:
    """One Secret read: None when it does not exist, :class:`SecretForbidden` on a 403."""
    try:
        return read()
    except ApiException as exc:
        if exc.status == 404:
            return None
        if exc.status == 403:
            raise SecretForbidden(server_message(exc)) from None
        raise


_METADATA_ONLY = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1"


def secret_labels(namespace: str, name: str) -> dict[str, str] | None:
    """A Secret's labels, or None when it does not exist (403 raises :class:`SecretForbidden`). A
    metadata-only GET (the API server answers a PartialObjectMetadata): the Secret's data never leaves
    the API server."""
    resp = _read_secret(lambda: api_client().call_api(
        "/api/v1/namespaces/{namespace}/secrets/{name}", "GET",
        path_params={"namespace": namespace, "name": name},
        header_params={"Accept": _METADATA_ONLY},
        auth_settings=["BearerToken"],
        _return_http_data_only=True,
        _preload_content=False,
    ))
    if resp is None:
        return None
    meta = json.loads(resp.data).get("metadata") or {}
    return dict(meta.get("labels") or {})


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
        _drain(_core().create_namespaced_event(meta["namespace"], event, _preload_content=False))
    except ApiException as exc:  # an event is advisory: never fail a reconcile over it
        log.warning("could not post event %s on %s/%s: %s", reason, meta["namespace"], meta["name"], exc.reason)
