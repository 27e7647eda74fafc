"""Handlers: read what the cluster holds, ask the pure state machine what to do, do it.

Three steps, in this order, on every reconcile: :func:`observe` gathers everything
:func:`~finetune_operator.state.decide` looks at (the indexed children, the trainer's progress, the
credentials Secret when a Job may be created), ``decide`` makes the one decision, and :func:`_apply`
executes the plan without second-guessing it.

Every entry point (create, resume, update, timer, child Job/pod events) ends in :func:`reconcile`,
which is level-based and idempotent. A per-object lock keeps two entry points from acting on the same
FineTuneJob at once; a resourceVersion precondition on the status write keeps a stale view from
winning, in which case the object is re-read and the reconcile runs again.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from pydantic import ValidationError

from finetune_api.documents import Lineage
from finetune_api.failures import SECRET_FORBIDDEN
from finetune_api.spec import FineTuneJobSpec, JobReference
from finetune_api.status import TERMINAL_PHASES
from finetune_api.validation import validation_message
from finetune_operator import kube, metrics
from finetune_operator.builders import CREDENTIAL_KEYS, Owner, build_config_map, build_job, build_service, config_map_name, job_name, service_name
from finetune_operator.config import OperatorConfig
from finetune_operator.expectations import Expectations
from finetune_operator.lineage import regression_event, with_teacher_uri
from finetune_operator.networkpolicy import build_network_policy, network_policy_name
from finetune_operator.policy import Selector, matches, namespace_refusal, pod_spec_refusal, secret_refusal
from finetune_operator.progress import ProgressReader, endpoint_allowed, endpoint_refusal, project, secret_values, tracking_refusal
from finetune_operator.state import Observed, Plan, decide, may_create_job
from finetune_operator.views import JobView, PodView, foreign_owner, owned

log = logging.getLogger(__name__)

_locks: dict[str, threading.Lock] = defaultdict(threading.Lock)
_locks_guard = threading.Lock()
# This operator's own writes its watches have not shown it yet (finetune_operator.expectations).
_expected = Expectations()


def _lock(uid: str) -> threading.Lock:
    with _locks_guard:
        return _locks[uid]


def forget(uid: str) -> None:
    with _locks_guard:
        _locks.pop(uid, None)
    _expected.forget(uid)
    if _progress_reader is not None:
        _progress_reader.forget(uid)


_progress_reader: ProgressReader | None = None


def _reader(config: OperatorConfig) -> ProgressReader:
    """One reader for the whole operator (its cache and thread pool are shared by all jobs)."""
    global _progress_reader
    if _progress_reader is None:
        _progress_reader = ProgressReader(secret_values(secret_reader(config.secret_selector)), interval=config.progress_interval)
    return _progress_reader


def spec_error(err: ValidationError) -> str:
    """The trainer's words for the same problem (finetune_api.validation)."""
    return validation_message(err)


def parse(body: Mapping[str, Any]) -> tuple[FineTuneJobSpec | None, str | None]:
    try:
        return FineTuneJobSpec.model_validate(dict(body.get("spec") or {})), None
    except ValidationError as err:
        return None, spec_error(err)


def secret_reader(selector: Selector) -> Callable[[str, str], Any]:
    """``kube.read_secret``, or with a selector (storage.credentialsSecretLabels) one that reads a
    Secret's values only after its metadata showed the labels (else None: no credentials)."""
    if not selector:
        return kube.read_secret

    def read(namespace: str, name: str) -> Any:
        labels = kube.secret_labels(namespace, name)
        return kube.read_secret(namespace, name) if labels is not None and matches(labels, selector) else None

    return read


def check_secret(namespace: str, spec: FineTuneJobSpec, selector: Selector = ()) -> tuple[str, str] | None:
    """(reason, message) when storage.credentialsSecret is not usable. With a ``selector``
    (storage.credentialsSecretLabels) the Secret's metadata is read first, and its keys only when it
    carries the labels: the values of a Secret not meant for the operator never reach it."""
    ref = spec.storage.credentials_secret
    if ref is None:
        return None
    missing_secret = (
        "SecretNotFound",
        f"storage.credentialsSecret {ref.name!r} does not exist in namespace {namespace}: create it with keys "
        f"{', '.join(CREDENTIAL_KEYS)} (kubectl create secret generic {ref.name} --from-literal=AWS_ACCESS_KEY_ID=... "
        f"--from-literal=AWS_SECRET_ACCESS_KEY=...), then re-create this FineTuneJob",
    )
    try:
        if selector:
            labels = kube.secret_labels(namespace, ref.name)
            if labels is None:
                return missing_secret
            refused = secret_refusal(namespace, ref.name, labels, selector)
            if refused:
                return refused
        keys = kube.secret_keys(namespace, ref.name)
    except kube.SecretForbidden:
        return (
            SECRET_FORBIDDEN.reason,
            f"the operator may not read Secrets in namespace {namespace}, so it cannot check storage.credentialsSecret "
            f"{ref.name!r}: on this cluster a cluster admin grants that per namespace (chart values rbac.clusterWideSecrets: "
            f"false, rbac.credentialsNamespaces; see the chart README), then re-create this FineTuneJob",
        )
    if keys is None:
        return missing_secret
    missing = [k for k in CREDENTIAL_KEYS if k not in keys]
    if missing:
        return (
            "SecretMissingKeys",
            f"storage.credentialsSecret {ref.name!r} lacks key(s) {', '.join(missing)}; it must hold "
            f"{', '.join(CREDENTIAL_KEYS)} (and optionally AWS_SESSION_TOKEN)",
        )
    return None


def _owner(body: Mapping[str, Any]) -> Owner:
    return Owner.of(body["metadata"])


def _status_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """A merge patch turning old into new (keys that disappeared are nulled, also one level down: a merge patch
    merges objects, so e.g. status.progress.fold would otherwise outlive the trainer's last fold)."""
    patch = {k: v for k, v in new.items() if old.get(k) != v}
    for k, v in patch.items():
        if isinstance(v, dict) and isinstance(old.get(k), dict):
            patch[k] = {**v, **{gone: None for gone in old[k] if gone not in v}}
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
    namespace_labels: Mapping[str, str] | None = None,
) -> None:
    """Drive one FineTuneJob one step towards its desired state. ``namespace_labels``: the labels of
    its namespace (from the operator's namespace index), needed only with ``config.namespace_selector``."""
    meta = body["metadata"]
    uid = meta["uid"]
    with _lock(uid), metrics.DURATION.labels(handler).time():
        metrics.RECONCILES.labels(handler).inc()
        jobs = list(jobs)
        if _expected.awaiting_job(uid, jobs):  # its ADDED event reconciles again, with the Job in view
            metrics.DEFERRED.inc()
            return
        try:
            _reconcile_locked(_expected.freshest(uid, dict(body)), jobs, list(pods), config, namespace_labels)
        except Exception:
            metrics.ERRORS.labels(handler).inc()
            raise


def _reconcile_locked(body: dict[str, Any], jobs: list[JobView], pods: list[PodView], config: OperatorConfig,
                      namespace_labels: Mapping[str, str] | None = None) -> None:
    """observe -> decide -> apply, again on a fresh read when the object changed under it (Conflict) or
    when the API server refused a child (Rejected), which the next decision then sees."""
    rejected: str | None = None
    for _ in range(3):
        if body["metadata"].get("deletionTimestamp"):
            return
        observed = observe(body, jobs, pods, config, rejected=rejected, namespace_labels=namespace_labels)
        try:
            _apply(body, observed.spec, decide(observed), config)
            return
        except kube.Rejected as exc:
            rejected = str(exc)
            log.warning("%s/%s: %s", body["metadata"]["namespace"], body["metadata"]["name"], rejected)
        except kube.Conflict:
            pass
        meta = body["metadata"]
        fresh = kube.get_finetunejob(meta["namespace"], meta["name"])
        if fresh is None:
            return
        body = fresh
    raise kube.Conflict(f"{body['metadata']['namespace']}/{body['metadata']['name']} kept changing under the reconcile; the next event or resync retries")


def observe(body: Mapping[str, Any], jobs: list[JobView], pods: list[PodView], config: OperatorConfig,
            rejected: str | None = None, namespace_labels: Mapping[str, str] | None = None) -> Observed:
    """Everything :func:`decide` needs, read before it decides.

    The progress document comes from the reader's cache (refreshed in the background) while the job
    is active. The credentials Secret is read only when the state allows a new Job
    (:func:`may_create_job`), not on every reconcile: it is the one GET a reconcile may add. In a
    namespace that has not opted in (``config.namespace_selector``) nothing is read at all: no Secret,
    no child names."""
    meta = body["metadata"]
    status = dict(body.get("status") or {})
    spec, error = parse(body)
    jobs, pods = owned(meta["uid"], jobs, pods)
    active = bool(status.get("jobName")) and status.get("phase") not in TERMINAL_PHASES
    progress = _reader(config).read(meta["uid"], meta["namespace"], spec) if spec is not None and active else None
    creating = spec is not None and may_create_job(status, spec, jobs)
    namespace_refused = namespace_refusal(meta["namespace"], namespace_labels, config.namespace_selector) if creating else None
    checking = creating and namespace_refused is None
    policy_refused = pod_spec_refusal(
        spec, default_image=config.defaults.trainer_image, allowed_images=config.allowed_images,
        allowed_priority_classes=config.allowed_priority_classes) if spec is not None and checking else None
    # A refused image or PriorityClass fails the job anyway: no Secret is read for it.
    secret_problem = ((check_secret(meta["namespace"], spec, config.secret_selector) or check_tracking_secret(meta["namespace"], spec, config.secret_selector))
                      if spec is not None and checking and not policy_refused else None)
    conflict = name_conflict(_owner(body), int(status.get("attempt") or 0), network_policy=config.defaults.network_policy) if checking else None
    # spec.model.fromJob: the parent, in this namespace only, read until its lineage is pinned in status.
    parent_read, parent = _read_reference(meta["namespace"], spec.model.from_job if spec else None, checking and not status.get("lineage"))
    teacher_ref = spec.distillation.teacher.from_job if spec is not None and spec.distillation is not None else None
    teacher_read, teacher = _read_reference(meta["namespace"], teacher_ref, checking and not status.get("teacherUri"))
    return Observed(
        name=meta["name"],
        namespace=meta["namespace"],
        generation=int(meta.get("generation") or 1),
        status=status,
        spec=spec,
        spec_error=error,
        jobs=tuple(jobs),
        pods=tuple(pods),
        secret_problem=secret_problem,
        progress=progress,
        name_conflict=conflict,
        create_rejected=rejected,
        endpoint_refused=_endpoint_refused(spec, config) if checking else None,
        policy_refused=policy_refused,
        namespace_refused=namespace_refused,
        progress_problem=_reader(config).problem(meta["uid"]) if spec is not None and active else None,
        parent=parent,
        parent_read=parent_read,
        teacher=teacher,
        teacher_read=teacher_read,
        timing=config.timing,
    )


def _read_reference(namespace: str, ref: JobReference | None, wanted: bool) -> tuple[bool, dict[str, Any] | None]:
    """A FineTuneJob this job names (model.fromJob, distillation.teacher.fromJob), in this namespace only:
    (read, the object or None when not found). Read only when ``wanted`` (a Job may be created and nothing is
    pinned in status yet)."""
    read = wanted and ref is not None
    return read, kube.get_finetunejob(namespace, ref.name) if read and ref is not None else None


def _endpoint_refused(spec: FineTuneJobSpec | None, config: OperatorConfig) -> str | None:
    if spec is None:
        return None
    if not endpoint_allowed(spec.storage.endpoint, config.allowed_endpoints):
        return endpoint_refusal(spec.storage.endpoint, config.allowed_endpoints)
    mlflow = spec.tracking.mlflow
    if mlflow is not None and not endpoint_allowed(mlflow.uri, config.allowed_endpoints):
        return tracking_refusal(mlflow.uri, config.allowed_endpoints)
    return None


def check_tracking_secret(namespace: str, spec: FineTuneJobSpec, selector: Selector = ()) -> tuple[str, str] | None:
    """(reason, message) when tracking.mlflow.credentialsSecret is missing or lacks the labels of
    storage.credentialsSecretLabels: the trainer sends its values to the tracking server, so it is held to
    the storage Secret's rule. Its keys are all optional, so only its metadata is read, never its values."""
    mlflow = spec.tracking.mlflow
    ref = mlflow.credentials_secret if mlflow is not None else None
    if ref is None:
        return None
    try:
        labels = kube.secret_labels(namespace, ref.name)
    except kube.SecretForbidden:
        return (
            SECRET_FORBIDDEN.reason,
            f"the operator may not read Secrets in namespace {namespace}, so it cannot check tracking.mlflow.credentialsSecret "
            f"{ref.name!r}: on this cluster a cluster admin grants that per namespace (chart values rbac.clusterWideSecrets: "
            f"false, rbac.credentialsNamespaces; see the chart README), then re-create this FineTuneJob",
        )
    if labels is None:
        return (
            "SecretNotFound",
            f"tracking.mlflow.credentialsSecret {ref.name!r} does not exist in namespace {namespace}: create it with keys "
            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN, then re-create this FineTuneJob",
        )
    return secret_refusal(namespace, ref.name, labels, selector, field="tracking.mlflow.credentialsSecret") if selector else None


def name_conflict(owner: Owner, attempt: int, *, network_policy: bool = False) -> str | None:
    """Whether an object we do not control holds a name the attempt's children need (three GETs, made
    only when a Job may be created): the Job index holds only labelled Jobs, and a Service or
    ConfigMap of ours is not watched at all."""
    children = [("Service", service_name(owner)), ("ConfigMap", config_map_name(owner)), ("Job", job_name(owner, attempt))]
    if network_policy:
        children.insert(2, ("NetworkPolicy", network_policy_name(owner)))
    for kind, name in children:
        meta = kube.read_meta(kind, owner.namespace, name)
        who = foreign_owner(meta, owner.uid) if meta is not None else None
        if who:
            return f"{kind} {name} already exists and is {who}"
    return None


def _apply(body: dict[str, Any], spec: FineTuneJobSpec | None, plan: Plan, config: OperatorConfig) -> None:
    """Execute ``plan``, in order: status, events, Job deletions and (un)suspends, new children, TTL."""
    meta = body["metadata"]
    ns, name = meta["namespace"], meta["name"]
    old_status = dict(body.get("status") or {})
    new_status = plan.status
    if plan.read_final_progress:
        assert spec is not None  # decide asks for it only for a valid spec
        final = _reader(config).read(meta["uid"], ns, spec, force=True)  # the last word of the trainer
        if final is not None:
            new_status = {**new_status, **project(final)}
    regression = regression_event(old_status, new_status)  # the trainer's gate said warn: tell the story in Events
    events = [*plan.events, regression] if regression else plan.events
    patch = _status_patch(old_status, new_status)
    if patch:
        _expected.wrote_status(meta["uid"], meta.get("resourceVersion"), kube.patch_status(ns, name, patch, meta.get("resourceVersion")))
        if new_status.get("phase") != old_status.get("phase"):
            metrics.TRANSITIONS.labels(new_status.get("phase") or "").inc()
        if int(new_status.get("restarts") or 0) > int(old_status.get("restarts") or 0):
            metrics.RESTARTS.inc()
    for event_type, reason, message in events:
        kube.post_event(body, event_type, reason, message, instance=config.instance)
        log.info("%s/%s: %s: %s", ns, name, reason, message)
    for job_name in plan.delete_jobs:
        kube.delete_job(ns, job_name)
    for job_name, suspend in plan.set_suspend.items():
        kube.set_job_suspend(ns, job_name, suspend)
    if plan.create_job is not None:
        assert spec is not None  # decide plans a Job only for a valid spec
        owner = _owner(body)
        spec = with_teacher_uri(spec, new_status.get("teacherUri"))  # the trainer reads the resolved teacher as a uri
        kube.create_owned(build_service(owner), owner.uid)
        kube.create_owned(build_config_map(owner, spec), owner.uid)
        if config.defaults.network_policy:  # before the Job, so its pods never run unprotected
            kube.create_owned(build_network_policy(owner, spec, config.defaults), owner.uid)
        lineage = Lineage.model_validate(new_status["lineage"]) if new_status.get("lineage") else None
        job = build_job(owner, spec, plan.create_job, config.defaults, lineage=lineage)
        kube.create_owned(job, owner.uid)
        _expected.created_job(owner.uid, job["metadata"]["name"])
    if plan.delete_self:
        kube.delete_finetunejob(ns, name)
