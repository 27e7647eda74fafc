"""What a FineTuneJob's children look like to the state machine: small frozen views of its batch Jobs
and pods, cut from the API objects (or Kopf bodies) so a reconcile holds only what it decides on.

Children are found by label (the watches are label-filtered), but they are *ours* only by uid: a Job
whose controller ownerReference is the FineTuneJob's ``metadata.uid``, and a pod whose controller is
one of those Jobs (:func:`owned`). Labels are anyone's to set: a tenant's pod with our labels and a
termination message, or the children of a deleted FineTuneJob of the same name, must never steer
this one."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from finetune_operator.builders import LABEL_ATTEMPT

@dataclass(frozen=True)
class PodView:
    name: str
    attempt: int
    index: int | None
    phase: str
    exit_code: int | None = None
    message: str | None = None
    reason: str | None = None
    # the pod-level status.message: why the kubelet ended it, e.g. an eviction for an emptyDir past its
    # sizeLimit (``Usage of EmptyDir volume "tmp" exceeds the limit "20Gi".``)
    status_message: str | None = None
    deleting: bool = False
    owner_uid: str | None = None  # uid of the pod's controller (its batch Job)
    # (reason, message) of why the pod is not running: a container waiting on an error
    # (ImagePullBackOff, CreateContainerConfigError, ...) or the scheduler's Unschedulable.
    waiting: tuple[str, str] | None = None
    created: str | None = None  # metadata.creationTimestamp

    @property
    def failed(self) -> bool:
        return self.phase == "Failed" or (self.exit_code is not None and self.exit_code != 0)


@dataclass(frozen=True)
class JobView:
    name: str
    attempt: int
    suspended: bool
    active: int = 0
    ready: int = 0
    succeeded: int = 0
    failed: int = 0
    complete: bool = False
    failed_condition: tuple[str, str] | None = None  # (reason, message)
    deleting: bool = False
    uid: str = ""
    owner_uid: str | None = None  # uid of the Job's controller (the FineTuneJob that made it)


def controller_uid(meta: dict[str, Any]) -> str | None:
    """The uid in the object's controller ownerReference (None when nothing controls it)."""
    for ref in meta.get("ownerReferences") or []:
        if ref.get("controller"):
            uid = ref.get("uid")
            return str(uid) if uid else None
    return None


def foreign_owner(meta: dict[str, Any], uid: str) -> str | None:
    """None when ``uid`` controls the object; else who does, in words for a condition message."""
    for ref in meta.get("ownerReferences") or []:
        if ref.get("controller"):
            if ref.get("uid") == uid:
                return None
            return f"controlled by {ref.get('kind', 'an object')} {ref.get('name', '?')} (uid {ref.get('uid', '?')})"
    return "not controlled by this FineTuneJob (no controller ownerReference)"


def owned(uid: str, jobs: Iterable[JobView], pods: Iterable[PodView]) -> tuple[list[JobView], list[PodView]]:
    """The Jobs this FineTuneJob (``uid``) controls, and the pods those Jobs control; everything else
    that carries our labels is ignored."""
    mine = [j for j in jobs if j.owner_uid == uid]
    job_uids = {j.uid for j in mine if j.uid}
    return mine, [p for p in pods if p.owner_uid is not None and p.owner_uid in job_uids]


def _attempt(meta: dict[str, Any]) -> int:
    try:
        return int((meta.get("labels") or {}).get(LABEL_ATTEMPT, "-1"))
    except ValueError:
        return -1


def job_view(job: dict[str, Any]) -> JobView:
    meta, spec, status = job.get("metadata", {}), job.get("spec", {}), job.get("status") or {}
    complete, failed_cond = False, None
    for cond in status.get("conditions") or []:
        if cond.get("status") != "True":
            continue
        if cond.get("type") == "Complete":
            complete = True
        elif cond.get("type") in ("Failed", "FailureTarget"):
            failed_cond = (cond.get("reason") or "Failed", cond.get("message") or "")
    return JobView(
        name=meta.get("name", ""),
        attempt=_attempt(meta),
        suspended=bool(spec.get("suspend")),
        active=int(status.get("active") or 0),
        ready=int(status.get("ready") or 0),
        succeeded=int(status.get("succeeded") or 0),
        failed=int(status.get("failed") or 0),
        complete=complete,
        failed_condition=failed_cond,
        deleting=bool(meta.get("deletionTimestamp")),
        uid=str(meta.get("uid") or ""),
        owner_uid=controller_uid(meta),
    )


# Container waiting reasons that are normal on the way to Running.
_STARTING = frozenset({"ContainerCreating", "PodInitializing"})


def _waiting(status: dict[str, Any]) -> tuple[str, str] | None:
    """Why a pod is not running yet, when something is wrong: a container waiting on an error, else
    the scheduler's Unschedulable condition."""
    for cs in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or []):
        waiting = (cs.get("state") or {}).get("waiting") or {}
        reason = waiting.get("reason")
        if reason and reason not in _STARTING:
            return str(reason), str(waiting.get("message") or "")[:1024]
    for cond in status.get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False" and cond.get("reason") == "Unschedulable":
            return "Unschedulable", str(cond.get("message") or "")[:1024]
    return None


def pod_view(pod: dict[str, Any]) -> PodView:
    meta, status = pod.get("metadata", {}), pod.get("status") or {}
    index = (meta.get("annotations") or {}).get("batch.kubernetes.io/job-completion-index")
    exit_code = message = reason = None
    for cs in status.get("containerStatuses") or []:
        term = (cs.get("state") or {}).get("terminated") or (cs.get("lastState") or {}).get("terminated")
        if term:
            exit_code = term.get("exitCode")
            message = (term.get("message") or "").strip() or None
            reason = term.get("reason")
            if exit_code:
                break
    return PodView(
        name=meta.get("name", ""),
        attempt=_attempt(meta),
        index=int(index) if index is not None and str(index).isdigit() else None,
        phase=status.get("phase") or "Pending",
        exit_code=exit_code,
        message=message,
        reason=reason or status.get("reason"),
        status_message=" ".join(str(status.get("message") or "").split())[:512] or None,
        deleting=bool(meta.get("deletionTimestamp")),
        owner_uid=controller_uid(meta),
        waiting=_waiting(status) if (status.get("phase") or "Pending") == "Pending" else None,
        created=meta.get("creationTimestamp"),
    )
