"""The pure state machine: each transition from observed cluster state."""

from datetime import datetime, timedelta, timezone

from finetune_api.spec import parse_spec
from finetune_operator.state import Observed, decide, iso
from finetune_operator.views import JobView, PodView, job_view, pod_view

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=timezone.utc)
BASE = {"model": {"uri": "s3://models/m"}, "dataset": {"train": "s3://data/t.jsonl"}, "output": {"uri": "s3://out/x"}}


def obs(status=None, jobs=(), pods=(), spec=None, now=NOW, **kw):
    return Observed(name="ft", namespace="ns", generation=3, status=status or {}, spec=parse_spec(spec or BASE),
                    jobs=tuple(jobs), pods=tuple(pods), now=now, **kw)


def cond(plan, ctype):
    return next(c for c in plan.status["conditions"] if c["type"] == ctype)


def running_job(attempt=0, **kw):
    return JobView(name=f"ft-{attempt}", attempt=attempt, suspended=False, active=1, **kw)


def test_new_job_creates_attempt_zero_and_goes_pending():
    plan = decide(obs())
    assert plan.create_job == 0
    assert plan.status["phase"] == "Pending" and plan.status["reason"] == "JobCreated"
    assert plan.status["startTime"] == iso(NOW)
    assert plan.status["observedGeneration"] == 3
    assert plan.status["jobName"] == "ft-0"
    assert plan.events == [("Normal", "JobCreated", "created Job ft-0 (1 node(s) x 1 GPU)")]


def test_all_pods_running_is_running_with_condition():
    plan = decide(obs({"phase": "Pending", "reason": "JobCreated", "attempt": 0, "restarts": 0},
                      jobs=[running_job()], pods=[PodView("ft-0-0", 0, 0, "Running")]))
    assert plan.create_job is None
    assert plan.status["phase"] == "Running"
    c = cond(plan, "Running")
    assert (c["status"], c["reason"], c["lastTransitionTime"], c["observedGeneration"]) == ("True", "PodsRunning", iso(NOW), 3)
    assert plan.events[0][1] == "PodsRunning"


def test_pods_that_finished_before_the_job_completes_count_as_started():
    two = {**BASE, "resources": {"nodes": 2}}
    pending = {"phase": "Pending", "reason": "JobCreated", "attempt": 0, "restarts": 0}
    one_done = decide(obs(pending, spec=two, jobs=[running_job()], pods=[PodView("ft-0-0", 0, 0, "Succeeded"), PodView("ft-0-1", 0, 1, "Running")]))
    assert (one_done.status["phase"], one_done.status["reason"]) == ("Running", "PodsRunning")
    all_done = decide(obs(pending, spec=two, jobs=[running_job()], pods=[PodView("ft-0-0", 0, 0, "Succeeded"), PodView("ft-0-1", 0, 1, "Succeeded")]))
    assert (all_done.status["phase"], all_done.status["reason"]) == ("Running", "PodsFinished")  # not Pending at 100%
    waiting = decide(obs(pending, spec=two, jobs=[running_job()], pods=[PodView("ft-0-0", 0, 0, "Succeeded"), PodView("ft-0-1", 0, 1, "Pending")]))
    assert waiting.status["phase"] == "Pending"


def test_condition_time_moves_only_on_flip():
    first = decide(obs({"phase": "Pending", "attempt": 0}, jobs=[running_job()], pods=[PodView("p", 0, 0, "Running")]))
    later = decide(obs(first.status, jobs=[running_job()], pods=[PodView("p", 0, 0, "Running")], now=NOW + timedelta(minutes=5)))
    assert cond(later, "Running")["lastTransitionTime"] == iso(NOW)
    assert later.events == []


def test_complete_job_succeeds():
    running = decide(obs({"phase": "Pending", "attempt": 0}, jobs=[running_job()], pods=[PodView("p", 0, 0, "Running")]))
    plan = decide(obs(running.status, jobs=[JobView("ft-0", 0, False, complete=True)]))
    assert plan.status["phase"] == "Succeeded" and plan.status["completionTime"] == iso(NOW)
    assert cond(plan, "Succeeded")["status"] == "True" and cond(plan, "Running")["status"] == "False"


def test_pod_failure_restarts_whole_group_with_reason():
    pod = PodView("ft-0-1", 0, 1, "Failed", exit_code=1, message="CUDA error: device-side assert")
    plan = decide(obs({"phase": "Running", "attempt": 0, "restarts": 0}, jobs=[running_job(failed=1)], pods=[pod]))
    assert plan.status["phase"] == "Restarting"
    assert plan.status["restarts"] == 1 and plan.status["attempt"] == 1
    assert plan.delete_jobs == ["ft-0"]
    assert "CUDA error" in plan.status["message"] and "restart 1/3" in plan.status["message"]
    assert plan.events[0][0] == "Warning"


def test_an_evicted_pod_says_which_limit_it_passed():
    """An emptyDir past its sizeLimit (resources.scratchSize) gets the pod evicted: no termination
    message, the kubelet's words in status.message, which the restart reason must carry."""
    pod = pod_view({
        "metadata": {"name": "ft-0-0", "labels": {"finetune.io/attempt": "0"}},
        "status": {"phase": "Failed", "reason": "Evicted", "message": 'Usage of EmptyDir volume "tmp" exceeds the limit "20Gi". '},
    })
    plan = decide(obs({"phase": "Running", "attempt": 0, "restarts": 0}, jobs=[running_job(failed=1)], pods=[pod]))
    assert plan.status["phase"] == "Restarting" and plan.status["reason"] == "PodFailed"
    assert 'pod ft-0-0 failed (Evicted: Usage of EmptyDir volume "tmp" exceeds the limit "20Gi".' in plan.status["message"]


def test_new_attempt_waits_for_old_job_then_is_created():
    status = {"phase": "Restarting", "reason": "PodFailed", "attempt": 1, "restarts": 1}
    waiting = decide(obs(status, jobs=[JobView("ft-0", 0, False, deleting=True)]))
    assert waiting.create_job is None and waiting.status["phase"] == "Restarting"
    created = decide(obs(status))
    assert created.create_job == 1 and created.status["phase"] == "Restarting"


def test_backoff_limit_exceeded_fails_with_last_reason():
    pod = PodView("ft-3-0", 3, 0, "Failed", exit_code=1, message="Traceback ...\nRuntimeError: boom")
    plan = decide(obs({"phase": "Running", "attempt": 3, "restarts": 3}, jobs=[running_job(3, failed=1)], pods=[pod]))
    assert plan.status["phase"] == "Failed" and plan.status["reason"] == "BackoffLimitExceeded"
    assert "RuntimeError: boom" in plan.status["message"]
    assert plan.status["completionTime"] == iso(NOW)


def test_permanent_trainer_error_fails_at_once():
    pod = PodView("ft-0-0", 0, 0, "Failed", exit_code=14, message="UnknownLabel: row 17 has label 'neutral' not in spec.model.labels")
    plan = decide(obs({"phase": "Running", "attempt": 0, "restarts": 0}, jobs=[running_job(failed=1)], pods=[pod]))
    assert plan.status["phase"] == "Failed" and plan.status["reason"] == "UnknownLabel"
    assert plan.status["restarts"] == 0
    assert "neutral" in plan.status["failureReason"]


def test_deleted_pod_counts_as_failure_from_job_condition():
    job = JobView("ft-0", 0, False, failed=1, failed_condition=("BackoffLimitExceeded", "Job has reached the specified backoff limit"))
    plan = decide(obs({"phase": "Running", "attempt": 0, "restarts": 0}, jobs=[job]))
    assert plan.status["phase"] == "Restarting" and plan.delete_jobs == ["ft-0"]


def test_suspend_and_resume():
    spec = {**BASE, "runPolicy": {"suspend": True}}
    plan = decide(obs({"phase": "Running", "attempt": 0}, jobs=[running_job()], spec=spec))
    assert plan.set_suspend == {"ft-0": True} and plan.status["phase"] == "Suspended"
    resumed = decide(obs(plan.status, jobs=[JobView("ft-0", 0, True)]))
    assert resumed.set_suspend == {"ft-0": False} and resumed.status["phase"] == "Pending"
    assert resumed.status["reason"] == "Resumed"
    assert cond(resumed, "Suspended")["status"] == "False"


def test_suspended_at_creation_creates_nothing():
    plan = decide(obs(spec={**BASE, "runPolicy": {"suspend": True}}))
    assert plan.create_job is None and plan.status["phase"] == "Suspended"


def test_kueue_job_waits_queued():
    spec = {**BASE, "resources": {"queueName": "q"}}
    plan = decide(obs({"phase": "Pending", "attempt": 0}, jobs=[JobView("ft-0", 0, True)], spec=spec))
    assert plan.status["phase"] == "Pending" and plan.status["reason"] == "Queued"
    assert plan.set_suspend == {}


def test_kueue_eviction_stopping_the_pods_is_no_failure():
    """Kueue preempts a running queued job: the Job is suspended and the pod being deleted exits 143 on
    SIGTERM; the job goes back to Queued, no restart. A pod that failed on its own still fails the group."""
    spec = {**BASE, "resources": {"queueName": "q"}}
    running = {"phase": "Running", "reason": "PodsRunning", "attempt": 0, "restarts": 0}
    stopping = PodView("ft-0-0", 0, 0, "Failed", exit_code=143, deleting=True)
    plan = decide(obs(running, jobs=[JobView("ft-0", 0, True)], pods=[stopping], spec=spec))
    assert (plan.status["phase"], plan.status["reason"], plan.status["restarts"]) == ("Pending", "Queued", 0)
    assert plan.delete_jobs == [] and plan.set_suspend == {}
    crashed = PodView("ft-0-0", 0, 0, "Failed", exit_code=1, message="CUDA error")
    assert decide(obs(running, jobs=[JobView("ft-0", 0, False)], pods=[crashed], spec=spec)).status["phase"] == "Restarting"
    unqueued = decide(obs(running, jobs=[JobView("ft-0", 0, True)], pods=[stopping]))
    assert unqueued.status["phase"] == "Restarting"  # not Kueue's: the operator did not suspend it either


def test_deadline_exceeded():
    spec = {**BASE, "runPolicy": {"activeDeadlineSeconds": 60}}
    plan = decide(obs({"phase": "Running", "attempt": 0, "startTime": iso(NOW - timedelta(seconds=61))}, jobs=[running_job()], spec=spec))
    assert plan.status["phase"] == "Failed" and plan.status["reason"] == "DeadlineExceeded"
    assert plan.delete_jobs == ["ft-0"]


def test_ttl_after_finished():
    spec = {**BASE, "runPolicy": {"ttlSecondsAfterFinished": 30}}
    done = {"phase": "Succeeded", "completionTime": iso(NOW - timedelta(seconds=10))}
    early = decide(obs(done, spec=spec))
    assert not early.delete_self and 19 <= early.requeue_after <= 20
    late = decide(obs(done, spec=spec, now=NOW + timedelta(seconds=21)))
    assert late.delete_self


def test_secret_problem_fails_with_message():
    plan = decide(obs(secret_problem=("SecretNotFound", "create it")))
    assert plan.status["phase"] == "Failed" and plan.status["reason"] == "SecretNotFound"
    assert plan.create_job is None


def test_invalid_spec_fails():
    o = Observed(name="ft", namespace="ns", generation=1, status={}, spec=None, spec_error="spec.x: bad", now=NOW)
    plan = decide(o)
    assert plan.status["phase"] == "Failed" and plan.status["message"] == "spec.x: bad"


def test_stale_attempts_are_deleted():
    plan = decide(obs({"phase": "Running", "attempt": 2}, jobs=[JobView("ft-1", 1, False), running_job(2)],
                      pods=[PodView("ft-2-0", 2, 0, "Running")]))
    assert plan.delete_jobs == ["ft-1"] and plan.status["phase"] == "Running"


def test_views_from_api_objects():
    job = job_view({"metadata": {"name": "ft-1", "labels": {"finetune.io/attempt": "1"}}, "spec": {"suspend": True},
                    "status": {"failed": 1, "conditions": [{"type": "FailureTarget", "status": "True", "reason": "PodFailurePolicy", "message": "m"}]}})
    assert job == JobView("ft-1", 1, True, failed=1, failed_condition=("PodFailurePolicy", "m"))
    pod = pod_view({"metadata": {"name": "ft-1-0", "labels": {"finetune.io/attempt": "1"},
                                 "annotations": {"batch.kubernetes.io/job-completion-index": "0"}},
                    "status": {"phase": "Failed", "containerStatuses": [{"state": {"terminated": {"exitCode": 13, "message": "MalformedData: 40% rows bad\n", "reason": "Error"}}}]}})
    assert (pod.index, pod.exit_code, pod.message, pod.failed) == (0, 13, "MalformedData: 40% rows bad", True)


TORCHRUN_TAIL = """InvalidConfig: cannot read config /etc/finetune/job.yaml: No such file or directory
E1121 12:53:25.491000 6542 torch/distributed/elastic/multiprocessing/api.py:1002] failed (exitcode: 11)
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
finetune_trainer FAILED
============================================================"""


def test_trainer_reason_found_inside_torchrun_output_and_is_permanent():
    # torchrun exits 1 whatever its worker's code was: the reason line decides permanence
    pod = PodView("ft-0-0", 0, 0, "Failed", exit_code=1, message=TORCHRUN_TAIL)
    plan = decide(obs({"phase": "Running", "attempt": 0, "restarts": 0}, jobs=[running_job(failed=1)], pods=[pod]))
    assert plan.status["phase"] == "Failed" and plan.status["reason"] == "InvalidConfig"
    assert "cannot read config" in plan.status["message"] and plan.status["restarts"] == 0


def test_transient_trainer_reason_is_retried():
    pod = PodView("ft-0-0", 0, 0, "Failed", exit_code=1, message="S3EndpointError: could not reach http://minio:9000")
    plan = decide(obs({"phase": "Running", "attempt": 0, "restarts": 0}, jobs=[running_job(failed=1)], pods=[pod]))
    assert plan.status["phase"] == "Restarting" and plan.status["reason"] == "S3EndpointError"


def test_unknown_crash_message_skips_launcher_decoration():
    pod = PodView("ft-0-0", 0, 0, "Failed", exit_code=1, message="RuntimeError: NCCL timeout\n====\nfoo FAILED\n-----")
    plan = decide(obs({"phase": "Running", "attempt": 0, "restarts": 0}, jobs=[running_job(failed=1)], pods=[pod]))
    assert plan.status["reason"] == "TrainerFailed" and plan.status["failureReason"].endswith("foo FAILED")


def test_a_name_conflict_waits_pending_and_creates_nothing():
    plan = decide(obs(name_conflict="Job ft-0 already exists and is controlled by FineTuneJob ft (uid u-old)"))
    assert plan.create_job is None and plan.delete_jobs == []
    assert (plan.status["phase"], plan.status["reason"]) == ("Pending", "ChildNameConflict")
    assert plan.status["message"].startswith("Job ft-0 already exists and is controlled by FineTuneJob ft (uid u-old); waiting")
    assert plan.events[0][:2] == ("Warning", "ChildNameConflict")


def test_a_child_the_api_server_rejects_fails_the_job_with_its_message():
    rejected = "the API server rejected Job ft-0: Job.batch \"ft-0\" is invalid: spec.template.spec.tolerations[0].operator: Unsupported value"
    plan = decide(obs({"phase": "Pending", "reason": "JobCreated", "attempt": 0, "jobName": "ft-0"}, create_rejected=rejected))
    assert plan.create_job is None
    assert (plan.status["phase"], plan.status["reason"]) == ("Failed", "ChildRejected")
    assert plan.status["message"].startswith(rejected) and plan.status["completionTime"] == iso(NOW)
    assert plan.read_final_progress is False  # nothing ran


def _waiting_pod(reason, message="", created=NOW):
    return PodView("ft-0-0", 0, 0, "Pending", waiting=(reason, message), created=iso(created))


def test_a_pod_stuck_on_an_image_pull_shows_why_then_fails_past_the_timeout():
    from finetune_operator.config import Timing

    pending = {"phase": "Pending", "reason": "JobCreated", "attempt": 0, "jobName": "ft-0"}
    pod = _waiting_pod("ImagePullBackOff", 'Back-off pulling image "nope:1"')
    early = decide(obs(pending, jobs=[running_job()], pods=[pod], now=NOW + timedelta(seconds=30), timing=Timing(pod_start_timeout=600)))
    assert (early.status["phase"], early.status["reason"]) == ("Pending", "ImagePullBackOff")
    assert early.status["message"] == ('pod ft-0-0 is not starting: ImagePullBackOff: Back-off pulling image "nope:1"; '
                                       f"the job fails at {iso(NOW + timedelta(seconds=600))} unless it starts")
    assert early.delete_jobs == [] and early.requeue_after == 570
    late = decide(obs(early.status, jobs=[running_job()], pods=[pod], now=NOW + timedelta(seconds=600), timing=Timing(pod_start_timeout=600)))
    assert (late.status["phase"], late.status["reason"]) == ("Failed", "PodStartFailed")
    assert "ImagePullBackOff" in late.status["message"] and "600s after the pod was created" in late.status["message"]
    assert late.delete_jobs == ["ft-0"]


def test_a_missing_secret_at_container_start_fails_past_the_timeout_too():
    pod = _waiting_pod("CreateContainerConfigError", 'secret "s3" not found')
    plan = decide(obs({"phase": "Pending", "attempt": 0, "jobName": "ft-0"}, jobs=[running_job()], pods=[pod], now=NOW + timedelta(hours=1)))
    assert plan.status["reason"] == "PodStartFailed" and 'secret "s3" not found' in plan.status["message"]


def test_an_unschedulable_pod_shows_the_schedulers_message_and_keeps_waiting():
    pod = _waiting_pod("Unschedulable", "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.")
    plan = decide(obs({"phase": "Pending", "attempt": 0, "jobName": "ft-0"}, jobs=[running_job()], pods=[pod], now=NOW + timedelta(days=1)))
    assert (plan.status["phase"], plan.status["reason"]) == ("Pending", "Unschedulable")
    assert plan.status["message"] == "pod ft-0-0 is not starting: Unschedulable: 0/3 nodes are available: 3 Insufficient nvidia.com/gpu."
    assert plan.delete_jobs == []


def test_pod_view_reads_the_waiting_reason():
    waiting = pod_view({"metadata": {"name": "p", "creationTimestamp": "2026-01-01T12:00:00Z"},
                        "status": {"phase": "Pending", "containerStatuses": [{"state": {"waiting": {"reason": "ErrImagePull", "message": "no such image"}}}]}})
    assert (waiting.waiting, waiting.created) == (("ErrImagePull", "no such image"), "2026-01-01T12:00:00Z")
    creating = pod_view({"metadata": {"name": "p"}, "status": {"phase": "Pending", "containerStatuses": [{"state": {"waiting": {"reason": "ContainerCreating"}}}]}})
    assert creating.waiting is None
    unschedulable = pod_view({"metadata": {"name": "p"}, "status": {"phase": "Pending", "conditions": [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "0/1 nodes"}]}})
    assert unschedulable.waiting == ("Unschedulable", "0/1 nodes")


def test_restarts_back_off_exponentially_and_bounded():
    from finetune_operator.config import Timing
    from finetune_operator.state import restart_delay

    timing = Timing(restart_backoff=20, restart_backoff_max=600)
    assert [restart_delay(timing, n) for n in (1, 2, 3, 4, 5, 6, 7, 100)] == [20, 40, 80, 160, 320, 600, 600, 600]
    assert restart_delay(Timing(restart_backoff=0), 3) == 0


def test_a_failed_group_waits_out_its_backoff_before_the_next_attempt():
    from finetune_operator.config import Timing

    timing = Timing(restart_backoff=20, restart_backoff_max=600)
    failing = {"phase": "Running", "reason": "PodsRunning", "attempt": 0, "restarts": 1, "jobName": "ft-0"}
    failed = decide(obs(failing, jobs=[running_job(failed=1)], timing=timing,
                        pods=[PodView("ft-0-0", 0, 0, "Failed", exit_code=19, message="S3EndpointError: could not reach")]))
    assert (failed.status["phase"], failed.status["restarts"], failed.status["attempt"]) == ("Restarting", 2, 1)
    assert failed.status["nextRestartTime"] == iso(NOW + timedelta(seconds=40))  # second restart: 2 x 20 s
    assert f"at {iso(NOW + timedelta(seconds=40))} (restart 2/3, backoff 40s)" in failed.status["message"]
    # old pods gone, backoff not over: nothing is created, the status does not change
    waiting = decide(obs(failed.status, timing=timing, now=NOW + timedelta(seconds=30)))
    assert waiting.create_job is None and waiting.events == [] and waiting.requeue_after == 10
    assert (waiting.status["phase"], waiting.status["message"]) == ("Restarting", failed.status["message"])
    due = decide(obs(failed.status, timing=timing, now=NOW + timedelta(seconds=40)))
    assert due.create_job == 1 and "nextRestartTime" not in due.status


def test_an_endpoint_outside_the_allow_list_fails_before_any_pod_starts():
    plan = decide(obs(endpoint_refused="storage.endpoint http://10.0.0.1 is not one of the operator's allowed storage endpoints"))
    assert (plan.status["phase"], plan.status["reason"]) == ("Failed", "EndpointNotAllowed")
    assert "http://10.0.0.1" in plan.status["message"]
    assert plan.create_job is None and plan.read_final_progress is False
    assert plan.events[0][:2] == ("Warning", "EndpointNotAllowed")


def test_a_progress_problem_is_shown_while_active_and_cleared_by_a_good_read():
    running = {"phase": "Running", "reason": "PodsRunning", "attempt": 0, "restarts": 0, "jobName": "ft-0"}
    pods = [PodView("ft-0-0", 0, 0, "Running")]
    plan = decide(obs(running, jobs=[running_job()], pods=pods, progress_problem="progress.json: body over 1048576 bytes"))
    assert plan.status["progressProblem"] == "progress.json: body over 1048576 bytes"
    assert plan.status["phase"] == "Running", "an unreadable progress document does not change the phase"
    cleared = decide(obs({**running, "progressProblem": "old"}, jobs=[running_job()], pods=pods))
    assert "progressProblem" not in cleared.status
