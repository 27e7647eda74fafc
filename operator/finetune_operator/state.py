"""The FineTuneJob state machine, as a pure function.

``decide(observed) -> Plan``: given the job's spec and status and what exists in the cluster (its
batch Jobs and pods), compute the next status and the actions to take. Handlers do the I/O around it.
Being pure and level-based, it can be re-run at any time (after a crash, on a timer, on any child
event) and converges to the same answer; deterministic child names make every action idempotent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from finetune_api.spec import FineTuneJobSpec
from finetune_api.status import Phase, TERMINAL_PHASES
from finetune_api.failures import EXIT_PREEMPTED, PERMANENT_EXIT_CODES, find_termination_line, last_meaningful_line

from finetune_operator import builders as B
from finetune_operator.progress import project as project_progress

CONDITION_TYPES = ("Running", "Restarting", "Suspended", "Succeeded", "Failed")
_PHASE_CONDITION = {
    Phase.running.value: "Running",
    Phase.restarting.value: "Restarting",
    Phase.suspended.value: "Suspended",
    Phase.succeeded.value: "Succeeded",
    Phase.failed.value: "Failed",
}


def now_utc() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


def iso(t: datetime) -> str:
    return t.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    return datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)


# ------------------------------------------------------------------------------- observed children


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
        return int((meta.get("labels") or {}).get(B.LABEL_ATTEMPT, "-1"))
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


# ---------------------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Observed:
    name: str
    namespace: str
    generation: int
    status: dict[str, Any]
    spec: FineTuneJobSpec | None
    spec_error: str | None = None
    jobs: tuple[JobView, ...] = ()
    pods: tuple[PodView, ...] = ()
    secret_problem: tuple[str, str] | None = None  # (reason, message)
    progress: Any = None  # finetune_api.status.ProgressDocument from the trainer, when there is one
    now: datetime = field(default_factory=now_utc)


@dataclass
class Plan:
    status: dict[str, Any]
    create_job: int | None = None  # attempt to create
    delete_jobs: list[str] = field(default_factory=list)
    set_suspend: dict[str, bool] = field(default_factory=dict)  # job name -> suspend
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (type, reason, message)
    delete_self: bool = False
    requeue_after: float | None = None
    ensure_children: bool = False

    @property
    def phase(self) -> str | None:
        return self.status.get("phase")


def _first_failure(pods: list[PodView], job: JobView | None) -> tuple[str, str, int | None, bool]:
    """(reason, message, exit code, permanent) of the group's failure, preferring the trainer's own words.

    Permanence comes from the trainer's reason when there is one (torchrun exits 1 whatever its worker's
    exit code was), else from the exit code."""
    failed = sorted((p for p in pods if p.failed), key=lambda p: (p.index if p.index is not None else 1 << 30, p.name))
    for pod in failed:
        if pod.message:
            found = find_termination_line(pod.message)
            if found:
                failure, line = found
                return failure.reason, f"pod {pod.name} (exit code {pod.exit_code}): {line}", pod.exit_code, failure.permanent
    for pod in failed:
        if pod.message:
            line = last_meaningful_line(pod.message)
            permanent = pod.exit_code is not None and pod.exit_code in PERMANENT_EXIT_CODES
            return "TrainerFailed", f"pod {pod.name} (exit code {pod.exit_code}): {line}", pod.exit_code, permanent
    if failed:
        pod = failed[0]
        what = pod.reason or "Error"
        return "PodFailed", f"pod {pod.name} failed ({what}, exit code {pod.exit_code})", pod.exit_code, False
    if job and job.failed_condition:
        reason, message = job.failed_condition
        return "PodFailed", f"job {job.name}: {reason}: {message or 'a pod failed or was deleted'}", None, False
    return "PodFailed", "a training pod failed or was deleted", None, False


def _set_phase(status: dict[str, Any], phase: str, reason: str, message: str, now: datetime, generation: int) -> None:
    """Set phase/reason/message and keep one condition per type; lastTransitionTime moves only when a
    condition's status flips."""
    status["phase"], status["reason"], status["message"] = phase, reason, message
    conditions = {c["type"]: dict(c) for c in status.get("conditions") or []}
    active = _PHASE_CONDITION.get(phase)
    for ctype in CONDITION_TYPES:
        want = "True" if ctype == active else "False"
        old = conditions.get(ctype)
        if old is None and want == "False":
            continue
        if want == "True":
            cond = {"type": ctype, "status": want, "reason": reason, "message": message}
        elif old.get("status") == "False":
            cond = dict(old)
        else:
            cond = {"type": ctype, "status": want, "reason": reason, "message": f"phase is {phase}"}
        flipped = old is None or old.get("status") != want
        cond["lastTransitionTime"] = iso(now) if flipped else old.get("lastTransitionTime", iso(now))
        cond["observedGeneration"] = generation
        conditions[ctype] = cond
    status["conditions"] = [conditions[t] for t in CONDITION_TYPES if t in conditions]


def decide(obs: Observed) -> Plan:
    old = obs.status or {}
    status: dict[str, Any] = {k: v for k, v in old.items()}
    status["observedGeneration"] = obs.generation
    status.setdefault("attempt", 0)
    status.setdefault("restarts", 0)
    plan = Plan(status=status)
    old_phase = old.get("phase")
    if obs.progress is not None and old_phase not in TERMINAL_PHASES:
        status.update(project_progress(obs.progress))

    def transition(phase: str, reason: str, message: str, event_type: str = "Normal") -> None:
        changed = (old_phase, old.get("reason")) != (phase, reason)
        _set_phase(status, phase, reason, message, obs.now, obs.generation)
        if changed:
            plan.events.append((event_type, reason, message))

    # ---- finished jobs: only TTL is left to act on
    if old_phase in TERMINAL_PHASES:
        policy = obs.spec.run_policy if obs.spec else None
        done = parse_time(old.get("completionTime"))
        if policy and policy.ttl_seconds_after_finished is not None and done:
            expires = done + timedelta(seconds=policy.ttl_seconds_after_finished)
            if obs.now >= expires:
                plan.delete_self = True
                plan.events.append(("Normal", "TTLExpired", f"deleting after ttlSecondsAfterFinished={policy.ttl_seconds_after_finished}"))
            else:
                plan.requeue_after = (expires - obs.now).total_seconds()
        return plan

    def fail(reason: str, message: str) -> Plan:
        transition(Phase.failed.value, reason, message, "Warning")
        status["completionTime"] = iso(obs.now)
        return plan

    if obs.spec is None:
        return fail("InvalidSpec", obs.spec_error or "the spec does not validate")
    if obs.secret_problem:
        return fail(*obs.secret_problem)

    spec = obs.spec
    attempt = int(status["attempt"])
    plan.ensure_children = True
    current = [j for j in obs.jobs if j.attempt == attempt and not j.deleting]
    job = current[0] if current else None
    stale = [j for j in obs.jobs if j.attempt != attempt]
    plan.delete_jobs.extend(j.name for j in stale if not j.deleting)
    pods = [p for p in obs.pods if p.attempt == attempt]
    queued = bool(spec.resources.queue_name)

    # ---- deadline, measured from the first start
    started = parse_time(old.get("startTime"))
    deadline = spec.run_policy.active_deadline_seconds
    if deadline and started and obs.now >= started + timedelta(seconds=deadline):
        if job:
            plan.delete_jobs.append(job.name)
        return fail("DeadlineExceeded", f"the job ran longer than runPolicy.activeDeadlineSeconds={deadline}")
    if deadline and started:
        plan.requeue_after = (started + timedelta(seconds=deadline) - obs.now).total_seconds()

    # ---- suspend / resume
    if spec.run_policy.suspend:
        if job and queued:
            plan.delete_jobs.append(job.name)  # Kueue owns .spec.suspend of queued Jobs; re-create on resume
            status["attempt"] = attempt + 1
        elif job and not job.suspended:
            plan.set_suspend[job.name] = True
        transition(Phase.suspended.value, "Suspended", "runPolicy.suspend is true: pods stopped (the trainer checkpoints on SIGTERM)")
        return plan
    if old_phase == Phase.suspended.value and job and job.suspended and not queued:
        plan.set_suspend[job.name] = False
        transition(Phase.pending.value, "Resumed", "runPolicy.suspend is false: pods are starting again and resume from the latest checkpoint")
        return plan

    # ---- create the attempt's Job once every older one is gone (their pods may still be checkpointing)
    if job is None:
        if any(j.attempt != attempt for j in obs.jobs):
            transition(old_phase or Phase.pending.value, old.get("reason") or "WaitingForOldPods", old.get("message") or "waiting for the previous attempt's pods to exit")
            plan.requeue_after = 2.0
            return plan
        plan.create_job = attempt
        status.setdefault("startTime", iso(obs.now))
        status["jobName"] = B.job_name(B.Owner(obs.name, obs.namespace, ""), attempt)
        if old_phase in (None, Phase.suspended.value):
            transition(Phase.pending.value, "JobCreated", f"created Job {status['jobName']} ({spec.resources.nodes} node(s) x {spec.resources.gpus_per_node} GPU)")
        return plan

    # ---- the group finished
    if job.complete:
        status["completionTime"] = iso(obs.now)
        transition(Phase.succeeded.value, "Completed", f"all {spec.resources.nodes} training pod(s) finished successfully")
        return plan

    failed = job.failed_condition is not None or job.failed > 0 or any(p.failed for p in pods)
    if failed:
        reason, message, code, permanent = _first_failure(pods, job)
        status["failureReason"] = message
        if permanent:
            return fail(reason, f"{message} (permanent: not retried)")
        restarts = int(status.get("restarts", 0))
        limit = spec.run_policy.backoff_limit
        if restarts >= limit:
            return fail("BackoffLimitExceeded", f"restarted {restarts} time(s), runPolicy.backoffLimit={limit}; last failure: {message}")
        status["restarts"] = restarts + 1
        status["attempt"] = attempt + 1
        plan.delete_jobs.append(job.name)
        why = "preempted" if code == EXIT_PREEMPTED else "failed"
        transition(
            Phase.restarting.value,
            reason,
            f"group {why}, restarting from the latest checkpoint (restart {restarts + 1}/{limit}): {message}",
            "Warning",
        )
        return plan

    # ---- still going
    running = sum(1 for p in pods if p.phase == "Running" and not p.deleting)
    # Pods that already exited 0 count as started: a short run's pods can finish before the Job is marked
    # complete, and the job has been running, not pending, all along.
    finished = sum(1 for p in pods if p.phase == "Succeeded" and not p.deleting)
    if job.suspended and queued:
        transition(Phase.pending.value, "Queued", f"waiting for Kueue to admit the job in queue {spec.resources.queue_name}")
    elif running + finished >= spec.resources.nodes and running:
        transition(Phase.running.value, "PodsRunning", f"{running}/{spec.resources.nodes} training pod(s) running")
    elif running + finished >= spec.resources.nodes:
        transition(Phase.running.value, "PodsFinished", f"all {finished} training pod(s) exited successfully; waiting for the Job to complete")
    elif old_phase == Phase.restarting.value:
        transition(Phase.restarting.value, old.get("reason") or "Restarting", old.get("message") or "restarting")
    else:
        transition(Phase.pending.value, old.get("reason") if old_phase == Phase.pending.value else "WaitingForPods",
                   old.get("message") if old_phase == Phase.pending.value else f"{running}/{spec.resources.nodes} training pod(s) running")
    return plan
