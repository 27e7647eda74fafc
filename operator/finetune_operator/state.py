"""The FineTuneJob state machine, as a pure function.

``decide(observed) -> Plan``: given the job's spec and status and what exists in the cluster (its
batch Jobs and pods, the trainer's progress, whether its credentials Secret is usable), compute the
next status and the actions to take. The handler gathers all of that first and then only executes
the plan: it never edits a plan or decides twice. Being pure and level-based, ``decide`` can be
re-run at any time (after a crash, on a timer, on any child event) and converges to the same answer;
deterministic child names make every action idempotent.

``decide`` picks the situation the job is in and hands it to one small function each: finished
(:func:`_finished`), past its deadline (:func:`_deadline_passed`), suspended (:func:`_suspend`,
:func:`_resume`), to create (:func:`_to_create`), succeeded (:func:`_succeeded`), failed
(:func:`_failed`, with an exponential restart backoff: :func:`restart_delay`), running
(:func:`_running`), pods that do not start (:func:`_waiting`), child names held by objects the job
does not control (:func:`_name_conflict`) and a namespace that has not opted in
(:func:`_namespace_not_enabled`; the chart's other restrictions fail the job, see
``finetune_operator.policy``). Only children the FineTuneJob controls by uid reach
``decide`` (``finetune_operator.views.owned``, applied by the handler's observe step).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeVar

from finetune_api.status import ProgressDocument
from finetune_api.spec import FineTuneJobSpec
from finetune_api.status import Phase, TERMINAL_PHASES
from finetune_api.failures import NAMESPACE_NOT_ENABLED, WAITING_FOR_PARENT_JOB, EXIT_PREEMPTED, PERMANENT_EXIT_CODES, find_termination_line, last_meaningful_line

from finetune_operator.builders import Owner, job_name
from finetune_operator.config import Timing
from finetune_operator.conditions import iso, now_utc, parse_time, set_phase as _set_phase
from finetune_operator.lineage import Reference, resolve_parent, resolve_teacher
from finetune_operator.progress import project as project_progress
from finetune_operator.views import JobView, PodView

T = TypeVar("T")

# ---------------------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Observed:
    """Everything :func:`decide` looks at, gathered by the handler before it decides."""

    name: str
    namespace: str
    generation: int
    status: dict[str, Any]
    spec: FineTuneJobSpec | None
    spec_error: str | None = None
    jobs: tuple[JobView, ...] = ()
    pods: tuple[PodView, ...] = ()
    # (reason, message) when storage.credentialsSecret is missing or incomplete. Read only when
    # may_create_job() holds, and consulted only when a Job is about to be created.
    secret_problem: tuple[str, str] | None = None
    progress: ProgressDocument | None = None  # the trainer's latest document, when there is one
    # A child name of the attempt to create (Service, ConfigMap, Job) is held by an object this
    # FineTuneJob does not control (by uid): what holds it, in words. Read, like the Secret, only when
    # may_create_job() holds. ``jobs``/``pods`` hold only the children this FineTuneJob controls.
    name_conflict: str | None = None
    # The API server refused to create one of the attempt's children (400/413/422), in its own words:
    # the same object would be refused again, so the job fails instead of retrying silently.
    create_rejected: str | None = None
    # storage.endpoint is outside the chart's storage.allowedEndpoints (progress.endpoint_allowed): the
    # operator will not contact it, so the job is refused before a pod starts. The refusal, in words.
    endpoint_refused: str | None = None
    # The chart's restrictions (finetune_operator.policy), checked like the Secret only when
    # may_create_job() holds. policy_refused: (reason, message) for an image or PriorityClass the chart
    # does not allow: the job fails. namespace_refused: the namespace has not opted in (namespaceSelector):
    # the job waits Pending, and the handler has read no Secret and made no other check there.
    policy_refused: tuple[str, str] | None = None
    namespace_refused: str | None = None
    # Why the last read of the trainer's progress failed (progress.ProgressReader.problem), shown in
    # status.progressProblem while the job is active; None once a read succeeds.
    progress_problem: str | None = None
    # spec.model.fromJob, read only when may_create_job() holds and status has no lineage yet: the parent
    # FineTuneJob's body (None: there is none in the namespace). parent_read says it was looked up.
    parent: dict[str, Any] | None = None
    parent_read: bool = False
    # spec.distillation.teacher.fromJob, read the same way until status.teacherUri is pinned.
    teacher: dict[str, Any] | None = None
    teacher_read: bool = False
    timing: Timing = field(default_factory=Timing)  # the operator's time limits (pod start, restart backoff)
    now: datetime = field(default_factory=now_utc)


@dataclass
class Plan:
    """What to do, in the order the handler does it: write ``status``, post ``events``, delete and
    (un)suspend Jobs, create the attempt's children, delete the FineTuneJob itself."""

    status: dict[str, Any]
    create_job: int | None = None  # attempt to create
    delete_jobs: list[str] = field(default_factory=list)
    set_suspend: dict[str, bool] = field(default_factory=dict)  # job name -> suspend
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (type, reason, message)
    delete_self: bool = False
    # When the next time-based change is due (TTL, deadline, old pods gone). Informational: the
    # resync loop reconciles every job every few seconds, so nothing has to be scheduled.
    requeue_after: float | None = None
    # The job just finished: read the trainer's progress document once more, synchronously, and write
    # its last word (final metrics, model URI) with this status.
    read_final_progress: bool = False


def may_create_job(status: dict[str, Any], spec: FineTuneJobSpec | None, jobs: Iterable[JobView]) -> bool:
    """Whether :func:`decide` could plan a new Job for this state: the one decision that needs the
    credentials Secret, so the handler reads it (one GET) only then. It is a superset of decide's own
    condition (it ignores the deadline), which is enough: decide consults the Secret only at the point
    where it would create the Job."""
    if spec is None or status.get("phase") in TERMINAL_PHASES or spec.run_policy.suspend:
        return False
    attempt = int(status.get("attempt") or 0)
    return not any(j.attempt != attempt or not j.deleting for j in jobs)


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
        if pod.status_message:  # an eviction says why: the disk or memory past its limit
            what = f"{what}: {pod.status_message}"
        return "PodFailed", f"pod {pod.name} failed ({what}, exit code {pod.exit_code})", pod.exit_code, False
    if job and job.failed_condition:
        reason, message = job.failed_condition
        return "PodFailed", f"job {job.name}: {reason}: {message or 'a pod failed or was deleted'}", None, False
    return "PodFailed", "a training pod failed or was deleted", None, False


# ------------------------------------------------------------------------------------ the decision


def decide(obs: Observed) -> Plan:
    """The next status and actions for one FineTuneJob, in one pure step (see the module docstring)."""
    plan = _start(obs)
    if obs.status.get("phase") in TERMINAL_PHASES:
        return _finished(obs, plan)
    if obs.spec is None:
        return _fail(obs, plan, "InvalidSpec", obs.spec_error or "the spec does not validate")
    spec = obs.spec
    group = _Group.of(obs, spec, int(plan.status["attempt"]))
    plan.delete_jobs.extend(j.name for j in obs.jobs if j.attempt != group.attempt and not j.deleting)
    if _deadline_passed(obs, spec, group, plan):
        return plan
    if spec.run_policy.suspend:
        return _suspend(obs, group, plan)
    job = group.job
    if obs.status.get("phase") == Phase.suspended.value and job and job.suspended and not group.queued:
        return _resume(obs, job, plan)
    if job is None:
        return _to_create(obs, spec, group, plan)
    if job.complete:
        return _succeeded(obs, spec, plan)
    # Kueue suspended the Job (evicted or preempted it): the Job controller stops its pods, and one that
    # exits non-zero on that SIGTERM is no training failure (the Job does not count it either).
    evicted = group.queued and job.suspended
    if job.failed_condition is not None or job.failed > 0 or any(p.failed and not (evicted and p.deleting) for p in group.pods):
        return _failed(obs, spec, group, job, plan)
    return _running(obs, spec, group, job, plan)


@dataclass(frozen=True)
class _Group:
    """The current attempt's training group, as observed."""

    attempt: int
    job: JobView | None  # its Job, unless there is none or it is being deleted
    pods: list[PodView]
    queued: bool  # Kueue admits it (spec.resources.queueName), and owns the Job's .spec.suspend

    @classmethod
    def of(cls, obs: Observed, spec: FineTuneJobSpec, attempt: int) -> _Group:
        current = [j for j in obs.jobs if j.attempt == attempt and not j.deleting]
        return cls(attempt, current[0] if current else None, [p for p in obs.pods if p.attempt == attempt],
                   bool(spec.resources.queue_name))


def _start(obs: Observed) -> Plan:
    """The plan every situation starts from: the old status, with the generation and the trainer's
    latest progress (while the job is active)."""
    status = dict(obs.status)
    status["observedGeneration"] = obs.generation
    status.setdefault("attempt", 0)
    status.setdefault("restarts", 0)
    if obs.status.get("phase") not in TERMINAL_PHASES:
        if obs.progress is not None:
            status.update(project_progress(obs.progress))
        if obs.progress_problem:
            status["progressProblem"] = obs.progress_problem
        else:
            status.pop("progressProblem", None)
    return Plan(status=status)


def _transition(obs: Observed, plan: Plan, phase: str, reason: str, message: str, event_type: str = "Normal") -> None:
    """Move to ``phase``; an event is posted only when phase or reason changed."""
    changed = (obs.status.get("phase"), obs.status.get("reason")) != (phase, reason)
    _set_phase(plan.status, phase, reason, message, obs.now, obs.generation)
    if changed:
        plan.events.append((event_type, reason, message))


def _finish(obs: Observed, plan: Plan) -> Plan:
    """A job that ran (it has a Job) publishes the trainer's last progress with its final status."""
    plan.read_final_progress = obs.spec is not None and bool(obs.status.get("jobName"))
    return plan


def _fail(obs: Observed, plan: Plan, reason: str, message: str, *, last_word: bool = True) -> Plan:
    """Fail the job for good; ``last_word``: with the trainer's final progress (see :func:`_finish`)."""
    _transition(obs, plan, Phase.failed.value, reason, message, "Warning")
    plan.status["completionTime"] = iso(obs.now)
    return _finish(obs, plan) if last_word else plan


def _finished(obs: Observed, plan: Plan) -> Plan:
    """Succeeded or Failed: only ttlSecondsAfterFinished is left to act on."""
    ttl = obs.spec.run_policy.ttl_seconds_after_finished if obs.spec else None
    done = parse_time(obs.status.get("completionTime"))
    if ttl is None or done is None:
        return plan
    expires = done + timedelta(seconds=ttl)
    if obs.now >= expires:
        plan.delete_self = True
        plan.events.append(("Normal", "TTLExpired", f"deleting after ttlSecondsAfterFinished={ttl}"))
    else:
        plan.requeue_after = (expires - obs.now).total_seconds()
    return plan


def _deadline_passed(obs: Observed, spec: FineTuneJobSpec, group: _Group, plan: Plan) -> bool:
    """runPolicy.activeDeadlineSeconds, measured from the first start: past it, fail the job."""
    started = parse_time(obs.status.get("startTime"))
    deadline = spec.run_policy.active_deadline_seconds
    if not deadline or not started:
        return False
    if obs.now < started + timedelta(seconds=deadline):
        plan.requeue_after = (started + timedelta(seconds=deadline) - obs.now).total_seconds()
        return False
    if group.job:
        plan.delete_jobs.append(group.job.name)
    _fail(obs, plan, "DeadlineExceeded", f"the job ran longer than runPolicy.activeDeadlineSeconds={deadline}")
    return True


def _suspend(obs: Observed, group: _Group, plan: Plan) -> Plan:
    """runPolicy.suspend is set: stop the pods (clearing it resumes them, see :func:`_resume`)."""
    job = group.job
    if job and group.queued:
        plan.delete_jobs.append(job.name)  # Kueue owns .spec.suspend of queued Jobs; re-create on resume
        plan.status["attempt"] = group.attempt + 1
    elif job and not job.suspended:
        plan.set_suspend[job.name] = True
    _transition(obs, plan, Phase.suspended.value, "Suspended", "runPolicy.suspend is true: pods stopped (the trainer checkpoints on SIGTERM)")
    return plan


def _resume(obs: Observed, job: JobView, plan: Plan) -> Plan:
    """runPolicy.suspend cleared while the operator's suspend still holds the Job: lift it."""
    plan.set_suspend[job.name] = False
    _transition(obs, plan, Phase.pending.value, "Resumed", "runPolicy.suspend is false: pods are starting again and resume from the latest checkpoint")
    return plan


def _to_create(obs: Observed, spec: FineTuneJobSpec, group: _Group, plan: Plan) -> Plan:
    """No Job for this attempt: create it once every older one is gone (their pods may still be
    checkpointing), unless the credentials Secret is not usable."""
    old = obs.status
    if any(j.attempt != group.attempt for j in obs.jobs):
        _transition(obs, plan, old.get("phase") or Phase.pending.value, old.get("reason") or "WaitingForOldPods",
                    old.get("message") or "waiting for the previous attempt's pods to exit")
        plan.requeue_after = 2.0
        return plan
    due = parse_time(old.get("nextRestartTime"))
    if due is not None and obs.now < due:  # restart backoff (see restart_delay)
        _transition(obs, plan, old.get("phase") or Phase.restarting.value, old.get("reason") or "Restarting",
                    old.get("message") or f"restarting at {iso(due)}")
        plan.requeue_after = (due - obs.now).total_seconds()
        return plan
    plan.status.pop("nextRestartTime", None)
    if obs.namespace_refused:
        return _namespace_not_enabled(obs, plan, obs.namespace_refused)
    if obs.create_rejected:
        return _fail(obs, plan, "ChildRejected", f"{obs.create_rejected} (fix the spec and re-create the FineTuneJob)", last_word=False)
    if obs.endpoint_refused:
        return _fail(obs, plan, "EndpointNotAllowed", obs.endpoint_refused, last_word=False)
    if obs.policy_refused:
        return _fail(obs, plan, *obs.policy_refused, last_word=False)
    if obs.secret_problem:  # no Job of this attempt ran, so there is no last word to read
        return _fail(obs, plan, *obs.secret_problem, last_word=False)
    if spec.model.from_job is not None and not obs.status.get("lineage"):
        # the handler looks the parent up only when a Job may be created
        lineage = _referenced(obs, plan, obs.parent_read, lambda: resolve_parent(obs.name, obs.namespace, spec, obs.parent))
        if lineage is None:
            return plan
        plan.status["lineage"] = lineage.wire()  # pinned: a later attempt starts from the same model
    teacher_ref = spec.distillation.teacher.from_job if spec.distillation is not None else None
    if teacher_ref is not None and not obs.status.get("teacherUri"):
        teacher_uri = _referenced(obs, plan, obs.teacher_read, lambda: resolve_teacher(obs.name, obs.namespace, spec, obs.teacher))
        if teacher_uri is None:
            return plan
        plan.status["teacherUri"] = teacher_uri  # pinned: every attempt learns from the same teacher
    if obs.name_conflict:
        return _name_conflict(obs, plan, obs.name_conflict)
    plan.create_job = group.attempt
    plan.status.setdefault("startTime", iso(obs.now))
    plan.status["jobName"] = job_name(Owner(obs.name, obs.namespace, ""), group.attempt)
    # A job that waited for its namespace to opt in says so no longer once its Job exists.
    if old.get("phase") in (None, Phase.suspended.value) or old.get("reason") in (NAMESPACE_NOT_ENABLED.reason, WAITING_FOR_PARENT_JOB.reason):
        _transition(obs, plan, Phase.pending.value, "JobCreated",
                    f"created Job {plan.status['jobName']} ({spec.resources.nodes} node(s) x {spec.resources.gpus_per_node} GPU)")
    return plan


def _referenced(obs: Observed, plan: Plan, read: bool, resolve: Callable[[], Reference[T]]) -> T | None:
    """The value a FineTuneJob this job names resolved to (see :func:`~finetune_operator.lineage.resolve_reference`),
    or None with ``plan`` saying what to do instead: requeue until the handler has read it (``read``), stay Pending
    while it waits for it, or fail."""
    if not read:
        plan.requeue_after = 2.0
        return None
    ref = resolve()
    if ref.value is not None:
        return ref.value
    if ref.wait:
        _transition(obs, plan, Phase.pending.value, ref.reason or "", ref.message or "")
        plan.requeue_after = 5.0
    else:
        _fail(obs, plan, ref.reason or "", ref.message or "", last_word=False)
    return None


def _namespace_not_enabled(obs: Observed, plan: Plan, why: str) -> Plan:
    """The namespace has not opted in: create nothing, wait Pending (labelling the namespace lets the
    next resync go on), with one Warning saying who can fix it."""
    _transition(obs, plan, Phase.pending.value, NAMESPACE_NOT_ENABLED.reason, why, "Warning")
    plan.requeue_after = 10.0
    return plan


def _name_conflict(obs: Observed, plan: Plan, holder: str) -> Plan:
    """A child name is taken by an object we do not control: never adopt it (its status is not ours)
    and never delete it (it is not ours either). Wait, Pending, saying what holds the name: the usual
    case is the children of a deleted FineTuneJob of the same name, which the garbage collector
    removes shortly; a squatter has to be removed by whoever made it."""
    _transition(obs, plan, Phase.pending.value, "ChildNameConflict",
                f"{holder}; waiting for it to be deleted (the operator neither adopts nor deletes objects it does not own)", "Warning")
    plan.requeue_after = 5.0
    return plan


def _succeeded(obs: Observed, spec: FineTuneJobSpec, plan: Plan) -> Plan:
    plan.status["completionTime"] = iso(obs.now)
    _transition(obs, plan, Phase.succeeded.value, "Completed", f"all {spec.resources.nodes} training pod(s) finished successfully")
    return _finish(obs, plan)


def restart_delay(timing: Timing, restart: int) -> float:
    """Seconds before restart number ``restart`` (1, 2, ...): ``restart_backoff * 2**(restart-1)``, at most
    ``restart_backoff_max``. Exponential, so an outage of a few minutes (S3 down, a node draining) costs
    a few restarts instead of the whole backoffLimit in seconds; bounded, so a long run never waits
    long after a failure."""
    if timing.restart_backoff <= 0:
        return 0.0
    return float(min(timing.restart_backoff_max, timing.restart_backoff * 2 ** min(restart - 1, 30)))


def _failed(obs: Observed, spec: FineTuneJobSpec, group: _Group, job: JobView, plan: Plan) -> Plan:
    """The group failed: fail the job when the failure is permanent or the restarts are used up,
    else restart the whole group (a torchrun group cannot continue short a member)."""
    reason, message, code, permanent = _first_failure(group.pods, job)
    plan.status["failureReason"] = message
    if permanent:
        return _fail(obs, plan, reason, f"{message} (permanent: not retried)")
    restarts = int(plan.status.get("restarts", 0))
    limit = spec.run_policy.backoff_limit
    if restarts >= limit:
        return _fail(obs, plan, "BackoffLimitExceeded", f"restarted {restarts} time(s), runPolicy.backoffLimit={limit}; last failure: {message}")
    plan.status["restarts"] = restarts + 1
    plan.status["attempt"] = group.attempt + 1
    plan.delete_jobs.append(job.name)
    delay = restart_delay(obs.timing, restarts + 1)
    plan.status["nextRestartTime"] = iso(obs.now + timedelta(seconds=delay))
    why = "preempted" if code == EXIT_PREEMPTED else "failed"
    message = (f"group {why}, restarting from the latest checkpoint at {plan.status['nextRestartTime']} "
               f"(restart {restarts + 1}/{limit}, backoff {delay:g}s): {message}")
    _transition(obs, plan, Phase.restarting.value, reason, message, "Warning")
    return plan


# Container waiting reasons that do not fix themselves soon: past Timing.pod_start_timeout they fail the job.
STUCK_REASONS = frozenset({"ImagePullBackOff", "ErrImagePull", "InvalidImageName", "ErrImageNeverPull",
                           "CreateContainerConfigError", "CreateContainerError"})


def _waiting(obs: Observed, group: _Group, job: JobView, plan: Plan) -> Plan:
    """A pod of the group is not starting: say why in status (the waiting reason, the pod, the
    kubelet's or scheduler's message). Past ``Timing.pod_start_timeout`` from the pod's creation, a
    reason in :data:`STUCK_REASONS` fails the job (its Job is deleted); Unschedulable only waits."""
    pod = sorted((p for p in group.pods if p.waiting and not p.deleting), key=lambda p: p.name)[0]
    assert pod.waiting is not None
    reason, detail = pod.waiting
    text = f"pod {pod.name} is not starting: {reason}" + (f": {detail}" if detail else "")
    limit = obs.timing.pod_start_timeout
    if reason not in STUCK_REASONS or limit <= 0:
        _transition(obs, plan, Phase.pending.value, reason, text)
        return plan
    created = parse_time(pod.created) or obs.now
    fail_at = created + timedelta(seconds=limit)
    if obs.now >= fail_at:
        plan.delete_jobs.append(job.name)
        return _fail(obs, plan, "PodStartFailed", f"{text} (still not running {int(limit)}s after the pod was created)", last_word=False)
    plan.requeue_after = (fail_at - obs.now).total_seconds()
    _transition(obs, plan, Phase.pending.value, reason, f"{text}; the job fails at {iso(fail_at)} unless it starts", "Warning")
    return plan


def _running(obs: Observed, spec: FineTuneJobSpec, group: _Group, job: JobView, plan: Plan) -> Plan:
    """The group is still going: Queued, Pending, Running or (still) Restarting."""
    old, nodes = obs.status, spec.resources.nodes
    running = sum(1 for p in group.pods if p.phase == "Running" and not p.deleting)
    # Pods that already exited 0 count as started: a short run's pods can finish before the Job is marked
    # complete, and the job has been running, not pending, all along.
    finished = sum(1 for p in group.pods if p.phase == "Succeeded" and not p.deleting)
    if job.suspended and group.queued:
        _transition(obs, plan, Phase.pending.value, "Queued", f"waiting for Kueue to admit the job in queue {spec.resources.queue_name}")
    elif running + finished >= nodes and running:
        _transition(obs, plan, Phase.running.value, "PodsRunning", f"{running}/{nodes} training pod(s) running")
    elif running + finished >= nodes:
        _transition(obs, plan, Phase.running.value, "PodsFinished", f"all {finished} training pod(s) exited successfully; waiting for the Job to complete")
    elif any(p.waiting and not p.deleting for p in group.pods):
        return _waiting(obs, group, job, plan)
    elif old.get("phase") == Phase.restarting.value:
        _transition(obs, plan, Phase.restarting.value, old.get("reason") or "Restarting", old.get("message") or "restarting")
    else:
        waiting = f"{running}/{nodes} training pod(s) running"
        if old.get("phase") == Phase.pending.value:  # keep what the Pending phase was about (JobCreated, Resumed)
            _transition(obs, plan, Phase.pending.value, old.get("reason") or "WaitingForPods", old.get("message") or waiting)
        else:
            _transition(obs, plan, Phase.pending.value, "WaitingForPods", waiting)
    return plan
