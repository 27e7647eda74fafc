"""What decide() is given before it decides: the Secret precondition, the final progress read, and
the operator settings it all runs under."""

from datetime import datetime, timedelta, timezone

import pytest

from finetune_api.spec import parse_spec
from finetune_api.status import ConditionType
from finetune_operator.config import OperatorConfig, OperatorDefaults
from finetune_operator.state import Observed, decide, iso, may_create_job
from finetune_operator.views import JobView, PodView

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=timezone.utc)
BASE = {"model": {"uri": "s3://models/m"}, "dataset": {"train": "s3://data/t.jsonl"}, "output": {"uri": "s3://out/x"}}


def obs(status, jobs=(), pods=(), spec=BASE, **kw):
    return Observed(name="ft", namespace="ns", generation=3, status=status, spec=parse_spec(spec),
                    jobs=tuple(jobs), pods=tuple(pods), now=NOW, **kw)


def running_job(attempt=0, **kw):
    return JobView(name=f"ft-{attempt}", attempt=attempt, suspended=False, active=1, **kw)


SECRET = {**BASE, "storage": {"credentialsSecret": {"name": "s3"}}}
FAILED_POD = PodView("ft-0-0", 0, 0, "Failed", exit_code=1, message="RuntimeError: boom")

# (status, jobs, pods, spec) covering every situation decide() distinguishes
SCENARIOS = {
    "new": ({}, [], [], SECRET),
    "running": ({"phase": "Running", "attempt": 0, "jobName": "ft-0"}, [running_job()], [PodView("ft-0-0", 0, 0, "Running")], SECRET),
    "restarting, old pods exiting": ({"phase": "Restarting", "attempt": 1, "jobName": "ft-0"}, [JobView("ft-0", 0, False, deleting=True)], [], SECRET),
    "restarting, old pods gone": ({"phase": "Restarting", "attempt": 1, "restarts": 1, "jobName": "ft-0"}, [], [], SECRET),
    "own job being deleted": ({"phase": "Pending", "attempt": 0, "jobName": "ft-0"}, [JobView("ft-0", 0, False, deleting=True)], [], SECRET),
    "suspended": ({"phase": "Running", "attempt": 0}, [], [], {**SECRET, "runPolicy": {"suspend": True}}),
    "failed pod": ({"phase": "Running", "attempt": 0, "restarts": 0, "jobName": "ft-0"}, [running_job(failed=1)], [FAILED_POD], SECRET),
    "complete": ({"phase": "Running", "attempt": 0, "jobName": "ft-0"}, [JobView("ft-0", 0, False, complete=True)], [], SECRET),
    "succeeded": ({"phase": "Succeeded", "completionTime": iso(NOW)}, [], [], SECRET),
    "deadline": ({"phase": "Pending", "attempt": 1, "startTime": iso(NOW - timedelta(hours=2))}, [], [], {**SECRET, "runPolicy": {"activeDeadlineSeconds": 60}}),
}


@pytest.mark.parametrize("name", SCENARIOS)
def test_the_secret_is_read_whenever_decide_would_create_a_job(name):
    status, jobs, pods, spec = SCENARIOS[name]
    observed = obs(status, jobs=jobs, pods=pods, spec=spec)
    if decide(observed).create_job is not None:
        assert may_create_job(observed.status, observed.spec, observed.jobs)


def test_the_secret_is_not_read_while_a_job_runs_or_is_done():
    for name in ("running", "suspended", "failed pod", "complete", "succeeded", "restarting, old pods exiting"):
        status, jobs, _, spec = SCENARIOS[name]
        assert not may_create_job(status, parse_spec(spec), jobs), name
    assert not may_create_job({}, None, [])


@pytest.mark.parametrize("name", [n for n in SCENARIOS if n != "new"])
def test_a_secret_problem_matters_only_when_a_job_would_be_created(name):
    status, jobs, pods, spec = SCENARIOS[name]
    without = decide(obs(status, jobs=jobs, pods=pods, spec=spec))
    with_problem = decide(obs(status, jobs=jobs, pods=pods, spec=spec, secret_problem=("SecretNotFound", "create it")))
    if without.create_job is None:
        assert with_problem == without
    else:
        assert (with_problem.status["phase"], with_problem.status["reason"], with_problem.create_job) == ("Failed", "SecretNotFound", None)
        assert not with_problem.read_final_progress  # no Job of this attempt ran


def test_final_progress_is_read_when_a_job_that_ran_finishes():
    no_retry = {**BASE, "runPolicy": {"backoffLimit": 0}}
    finishing = {n: decide(obs(SCENARIOS[n][0], jobs=SCENARIOS[n][1], pods=SCENARIOS[n][2], spec=no_retry))
                 for n in ("complete", "failed pod", "running", "new")}
    assert finishing["complete"].read_final_progress and finishing["complete"].status["phase"] == "Succeeded"
    assert finishing["failed pod"].read_final_progress and finishing["failed pod"].status["phase"] == "Failed"
    assert not finishing["running"].read_final_progress and not finishing["new"].read_final_progress
    invalid = decide(Observed(name="ft", namespace="ns", generation=1, status={"jobName": "ft-0"}, spec=None, spec_error="bad", now=NOW))
    assert invalid.status["phase"] == "Failed" and not invalid.read_final_progress


def test_conditions_use_exactly_the_declared_types():
    seen = set()
    for name in SCENARIOS:
        status, jobs, pods, spec = SCENARIOS[name]
        seen |= {c["type"] for c in decide(obs(status, jobs=jobs, pods=pods, spec=spec)).status.get("conditions", [])}
    seen |= {c["type"] for c in decide(obs({"phase": "Running", "attempt": 0, "restarts": 0}, jobs=[running_job(failed=1)], pods=[FAILED_POD])).status["conditions"]}
    assert seen == {t.value for t in ConditionType}


def test_config_from_env_reads_every_setting():
    config = OperatorConfig.from_env({
        "FINETUNE_NAMESPACES": "a, b,", "FINETUNE_METRICS_PORT": "9100", "FINETUNE_RESYNC_SECONDS": "0",
        "FINETUNE_LOG_LEVEL": "debug", "FINETUNE_TRAINER_IMAGE": "t:1", "FINETUNE_TRAINER_PULL_POLICY": "Always",
        "FINETUNE_TERMINATION_GRACE_SECONDS": "5", "FINETUNE_PROGRESS_INTERVAL": "2.5", "FINETUNE_TRACEMALLOC": "1",
        "HOSTNAME": "op-7",
    })
    assert config == OperatorConfig(
        namespaces=("a", "b"), metrics_port=9100, resync_seconds=1, log_level="DEBUG",
        defaults=OperatorDefaults(trainer_image="t:1", image_pull_policy="Always", termination_grace_seconds=5),
        progress_interval=2.5, tracemalloc=True, instance="op-7",
    )
    assert OperatorConfig.from_env({}) == OperatorConfig()


def test_config_reads_the_network_policy_settings():
    config = OperatorConfig.from_env({"FINETUNE_NETWORK_POLICY": "false",
                                      "FINETUNE_METRICS_FROM_NAMESPACES": "team=obs, kubernetes.io/metadata.name=monitoring"})
    assert config.defaults.network_policy is False
    assert config.defaults.metrics_from_namespaces == (("kubernetes.io/metadata.name", "monitoring"), ("team", "obs"))
    assert OperatorConfig.from_env({}).defaults.network_policy is True
    with pytest.raises(SystemExit, match="FINETUNE_NETWORK_POLICY must be true or false, got 'maybe'"):
        OperatorConfig.from_env({"FINETUNE_NETWORK_POLICY": "maybe"})
    with pytest.raises(SystemExit, match="FINETUNE_METRICS_FROM_NAMESPACES must be key=value pairs"):
        OperatorConfig.from_env({"FINETUNE_METRICS_FROM_NAMESPACES": "monitoring"})


def test_config_names_the_bad_variable():
    with pytest.raises(SystemExit, match="FINETUNE_PROGRESS_INTERVAL must be a number, got 'soon'"):
        OperatorConfig.from_env({"FINETUNE_PROGRESS_INTERVAL": "soon"})


def test_timing_settings_come_from_the_environment():
    config = OperatorConfig.from_env({"FINETUNE_POD_START_TIMEOUT_SECONDS": "90", "FINETUNE_RESTART_BACKOFF_SECONDS": "5",
                                      "FINETUNE_RESTART_BACKOFF_MAX_SECONDS": "60"})
    assert (config.timing.pod_start_timeout, config.timing.restart_backoff, config.timing.restart_backoff_max) == (90, 5, 60)
    assert OperatorConfig.from_env({}).timing.pod_start_timeout == 600
