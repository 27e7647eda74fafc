"""What a FineTuneJob's children look like to the state machine: small frozen views of its batch Jobs
and pods, cut from the API objects (or Kopf bodies) so a reconcile holds only what it decides on."""

from __future__ import annotations

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
    deleting: bool = False

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
    )


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
        deleting=bool(meta.get("deletionTimestamp")),
    )
