"""model.fromJob in the operator: the pure resolution of a parent FineTuneJob, the decision, the pod env."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest

from finetune_api import env as pod_env
from finetune_api.documents import Lineage
from finetune_api.spec import parse_spec
from finetune_operator import builders
from finetune_operator.lineage import ExportedModel, NotExported, exported_model, lineage_env, regression_event, resolve_parent
from finetune_operator.state import Observed, decide

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=timezone.utc)
CHILD = {"model": {"fromJob": {"name": "parent"}}, "dataset": {"train": "s3://data/t.jsonl"}, "output": {"uri": "s3://out/child"}}
PARENT_SPEC = {"model": {"uri": "s3://models/base"}, "dataset": {"train": "s3://data/t.jsonl"}, "output": {"uri": "s3://out/parent"}}
DIGEST = "sha256:" + "ab" * 32


def parent(phase="Succeeded", spec=None, **status):
    return {"metadata": {"name": "parent", "namespace": "ns", "uid": "uid-p"}, "spec": spec or PARENT_SPEC,
            "status": {"phase": phase, "modelUri": "s3://out/parent/model", "testSetUri": "s3://out/parent/test-set.parquet",
                       "data": {"rowsRead": 10, "reportDigest": DIGEST}, **status}}


def test_what_a_job_exported_full_merged_or_an_adapter_chain():
    assert exported_model(parent(spec={**PARENT_SPEC, "method": "full"})) == ExportedModel("s3://out/parent/model")
    merged = exported_model(parent(spec={**PARENT_SPEC, "output": {"uri": "s3://out/parent", "mergeAdapter": True}}))
    assert merged == ExportedModel("s3://out/parent/model/merged") and not merged.is_adapter
    lora = exported_model(parent())
    assert lora == ExportedModel("s3://out/parent/model", base_model_uri="s3://models/base", adapters=("s3://out/parent/model",))
    # A LoRA job that itself started from a LoRA job: its adapter sits on the chain its own lineage names.
    grandchild_of = parent(spec={**PARENT_SPEC, "model": {"fromJob": {"name": "grandparent"}}},
                           lineage={"parentJob": "grandparent", "parentModelUri": "s3://out/gp/model",
                                    "baseModelUri": "s3://models/base", "adapters": ["s3://out/gp/model"]})
    assert exported_model(grandchild_of) == ExportedModel(
        "s3://out/parent/model", base_model_uri="s3://models/base", adapters=("s3://out/gp/model", "s3://out/parent/model"))
    on_full = parent(spec={**PARENT_SPEC, "model": {"fromJob": {"name": "gp"}}}, lineage={"parentJob": "gp", "parentModelUri": "s3://out/gp/model"})
    assert exported_model(on_full) == ExportedModel("s3://out/parent/model", base_model_uri="s3://out/gp/model", adapters=("s3://out/parent/model",))
    with pytest.raises(NotExported, match="no modelUri"):
        exported_model(parent(modelUri=None))


def test_a_succeeded_parent_gives_the_lineage_with_its_real_values():
    got = resolve_parent("child", "ns", parse_spec(CHILD), parent())
    assert got.value == Lineage(parent_job="parent", parent_uid="uid-p", parent_model_uri="s3://out/parent/model",
                                  base_model_uri="s3://models/base", adapters=["s3://out/parent/model"],
                                  parent_output_uri="s3://out/parent", parent_data_report_digest=DIGEST,
                                  parent_test_set_uri="s3://out/parent/test-set.parquet")


@pytest.mark.parametrize("body,reason,words", [
    (parent("Failed", reason="OutOfMemory", message="lower batchSize"), "ParentJobFailed", "Failed (OutOfMemory: lower batchSize)"),
    (parent(modelUri=None), "ParentJobFailed", "Succeeded but its status has no modelUri"),
    (parent(spec={**PARENT_SPEC, "model": {"uri": "s3://models/base", "task": "sequence-classification"},
                  "dataset": {"train": "s3://data/t", "format": "classification"}}), "ParentJobFailed", "must match"),
    (parent(spec={**PARENT_SPEC, "output": {"uri": "s3://out/child/parent"}}), "ParentJobFailed", "overlaps the parent's output"),
])
def test_a_missing_failed_or_unusable_parent_fails_the_child_with_a_reason(body, reason, words):
    got = resolve_parent("child", "ns", parse_spec(CHILD), body)
    assert got.value is None and not got.wait and got.reason == reason and words in (got.message or "")


def test_an_unfinished_parent_makes_the_child_wait_and_itself_is_no_parent():
    for phase in (None, "Pending", "Running", "Restarting", "Suspended"):
        got = resolve_parent("child", "ns", parse_spec(CHILD), parent(phase))
        assert got.wait and got.reason == "WaitingForParentJob" and got.value is None
    itself = resolve_parent("parent", "ns", parse_spec(CHILD), parent())
    assert itself.reason == "ParentJobFailed" and "names this job itself" in (itself.message or "")


def _obs(status=None, **kw):
    return Observed(name="child", namespace="ns", generation=1, status=status or {}, spec=parse_spec(CHILD), now=NOW, **kw)


def test_decide_waits_for_the_parent_then_creates_the_job_with_the_lineage_pinned():
    waiting = decide(_obs(parent=parent("Running"), parent_read=True))
    assert waiting.create_job is None and waiting.requeue_after
    assert (waiting.status["phase"], waiting.status["reason"]) == ("Pending", "WaitingForParentJob")
    assert waiting.events == [("Normal", "WaitingForParentJob", "waiting for FineTuneJob parent to succeed (it is Running): this job starts from its model")]
    started = decide(_obs(waiting.status, parent=parent(), parent_read=True))
    assert started.create_job == 0 and started.status["reason"] == "JobCreated"
    assert started.status["lineage"]["parentModelUri"] == "s3://out/parent/model"
    assert started.status["lineage"]["parentDataReportDigest"] == DIGEST
    # Once pinned, the parent is not looked at again (a restart starts from the same model).
    again = decide(_obs({**started.status, "jobName": None}, parent=None, parent_read=False))
    assert again.status["lineage"] == started.status["lineage"] and again.status.get("reason") != "ParentJobNotFound"


def test_the_child_of_a_missing_parent_waits_for_it_like_a_pod_for_a_configmap():
    """kubectl apply -f of a folder creates the child first as often as not: it waits Pending, and starts once the parent exists."""
    plan = decide(_obs(parent=None, parent_read=True))
    assert plan.create_job is None and plan.requeue_after and (plan.status["phase"], plan.status["reason"]) == ("Pending", "ParentJobNotFound")
    assert "no FineTuneJob parent in namespace ns yet" in plan.status["message"] and plan.events[0][0] == "Normal"
    later = decide(_obs(plan.status, parent=parent("Running"), parent_read=True))
    assert (later.status["phase"], later.status["reason"]) == ("Pending", "WaitingForParentJob")
    started = decide(_obs(later.status, parent=parent(), parent_read=True))
    assert started.create_job == 0 and started.status["lineage"]["parentJob"] == "parent"


def test_the_pods_get_the_lineage_env_and_a_user_cannot_forge_it():
    lineage = resolve_parent("child", "ns", parse_spec(CHILD), parent()).value
    assert lineage is not None
    spec = parse_spec({**CHILD, "resources": {"env": [{"name": pod_env.PARENT_MODEL_URI, "value": "s3://evil/model"}, {"name": "X", "value": "1"}]}})
    job = builders.build_job(builders.Owner("child", "ns", "uid-c"), spec, 0, builders.OperatorDefaults(), lineage=lineage)
    env = [(e["name"], e.get("value")) for e in job["spec"]["template"]["spec"]["containers"][0]["env"]]
    values = dict(env)
    assert [v for n, v in env if n == pod_env.PARENT_MODEL_URI] == ["s3://out/parent/model"] and values["X"] == "1"
    assert values[pod_env.PARENT_BASE_MODEL_URI] == "s3://models/base" and json.loads(values[pod_env.PARENT_ADAPTERS]) == ["s3://out/parent/model"]
    assert values[pod_env.PARENT_DATA_REPORT_DIGEST] == DIGEST and values[pod_env.PARENT_TEST_SET_URI] == "s3://out/parent/test-set.parquet"
    assert {e["name"] for e in lineage_env(lineage)} == set(pod_env.LINEAGE)
    plain = builders.build_job(builders.Owner("child", "ns", "uid-c"), spec, 0, builders.OperatorDefaults())
    assert not {e["name"] for e in plain["spec"]["template"]["spec"]["containers"][0]["env"]} & set(pod_env.LINEAGE)


def test_a_failed_gate_is_told_once_in_an_event():
    failed = {"regression": {"metric": "accuracy", "parent": 0.9, "child": 0.7, "drop": 0.2, "maxDrop": 0.0, "passed": False, "action": "warn"}}
    event = regression_event({}, failed)
    assert event is not None and event[:2] == ("Warning", "RegressionDetected") and "accuracy went from 0.9 (parent) to 0.7" in event[2]
    assert regression_event(failed, failed) is None
    assert regression_event({}, {"regression": {**failed["regression"], "passed": True}}) is None


def test_the_continuous_example_starts_from_the_sentiment_example():
    from pathlib import Path

    import yaml

    ROOT = Path(__file__).resolve().parents[3]
    child = yaml.safe_load((ROOT / "examples" / "continuous-from-sentiment.yaml").read_text())
    parent_manifest = yaml.safe_load((ROOT / "examples" / "sentiment-classification.yaml").read_text())
    assert child["spec"]["model"]["fromJob"]["name"] == parent_manifest["metadata"]["name"]
    body = {**parent_manifest, "status": {"phase": "Succeeded", "modelUri": parent_manifest["spec"]["output"]["uri"] + "/model"}}
    got = resolve_parent(child["metadata"]["name"], "default", parse_spec(child["spec"]), body)
    assert got.value is not None and got.value.base_model_uri == parent_manifest["spec"]["model"]["uri"]


# ------------------------------------------------------------------------------- distillation.teacher.fromJob

STUDENT = {"model": {"uri": "s3://models/student"}, "dataset": {"train": "s3://data/t.jsonl"}, "output": {"uri": "s3://out/student"},
           "distillation": {"teacher": {"fromJob": {"name": "parent"}}, "alpha": 0.7}}
FULL_TEACHER = {**PARENT_SPEC, "method": "full"}


def _student_obs(status=None, **kw):
    return Observed(name="student", namespace="ns", generation=1, status=status or {}, spec=parse_spec(STUDENT), now=NOW, **kw)


def test_a_teacher_job_resolves_to_its_whole_model_and_the_trainer_reads_it_as_a_uri():
    from finetune_operator.lineage import resolve_teacher, with_teacher_uri

    spec = parse_spec(STUDENT)
    assert resolve_teacher("student", "ns", spec, parent(spec=FULL_TEACHER)).value == "s3://out/parent/model"
    merged = parent(spec={**PARENT_SPEC, "output": {"uri": "s3://out/parent", "mergeAdapter": True}})
    assert resolve_teacher("student", "ns", spec, merged).value == "s3://out/parent/model/merged"
    resolved = with_teacher_uri(spec, "s3://out/parent/model")
    teacher = resolved.distillation.teacher
    assert (teacher.uri, teacher.from_job, resolved.distillation.alpha) == ("s3://out/parent/model", None, 0.7)
    assert spec.distillation.teacher.from_job.name == "parent"  # the stored spec is left alone
    # The config the trainer reads names the resolved model and parses back (exactly one of uri and fromJob).
    assert parse_spec(resolved.wire()).distillation.teacher.uri == "s3://out/parent/model"
    assert with_teacher_uri(parse_spec(PARENT_SPEC), "s3://x") == parse_spec(PARENT_SPEC)


@pytest.mark.parametrize("body,reason,words", [
    (parent("Failed", spec=FULL_TEACHER, reason="OutOfMemory", message="lower batchSize"), "ParentJobFailed", "Failed (OutOfMemory"),
    (parent(), "ParentJobFailed", "exported only an adapter"),  # a LoRA job without mergeAdapter
    (parent(spec={**FULL_TEACHER, "output": {"uri": "s3://out/student/teacher"}}), "ParentJobFailed", "overlaps the parent's output"),
])
def test_an_unusable_teacher_job_fails_the_student_with_a_reason(body, reason, words):
    from finetune_operator.lineage import resolve_teacher

    got = resolve_teacher("student", "ns", parse_spec(STUDENT), body)
    assert got.value is None and not got.wait and got.reason == reason and words in (got.message or "")


def test_decide_waits_for_the_teacher_job_then_pins_its_model_and_the_config_map_names_it():
    waiting = decide(_student_obs(teacher=parent("Running", spec=FULL_TEACHER), teacher_read=True))
    assert waiting.create_job is None and (waiting.status["phase"], waiting.status["reason"]) == ("Pending", "WaitingForParentJob")
    started = decide(_student_obs(waiting.status, teacher=parent(spec=FULL_TEACHER), teacher_read=True))
    assert started.create_job == 0 and started.status["teacherUri"] == "s3://out/parent/model"
    again = decide(_student_obs({**started.status, "jobName": None}, teacher=None, teacher_read=False))
    assert again.status["teacherUri"] == "s3://out/parent/model" and again.status.get("reason") != "ParentJobNotFound"
    missing = decide(_student_obs(teacher=None, teacher_read=True))
    assert (missing.status["phase"], missing.status["reason"]) == ("Pending", "ParentJobNotFound") and missing.create_job is None
    from finetune_operator.lineage import with_teacher_uri

    owner = builders.Owner("student", "ns", "uid-s")
    config = builders.build_config_map(owner, with_teacher_uri(parse_spec(STUDENT), started.status["teacherUri"]))
    assert "s3://out/parent/model" in json.dumps(config["data"]) and "fromJob" not in json.dumps(config["data"])
