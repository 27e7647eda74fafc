"""End to end: a continuous fine-tune (model.fromJob) through the operator, the process node and MinIO.

Two jobs: the sentiment example as the parent, and a child created at once with ``model.fromJob`` that
waits for it, starts from its LoRA adapter (merged into MiniLM), is trained to be worse (a learning rate
that wrecks the adapter) and is stopped by the regression gate (action fail). The child's status lineage
must hold the parent's real values: its model URI, the digest of the data-report.json it wrote, its test set.
"""

from __future__ import annotations

import hashlib

import pytest

from tests.integration.test_e2e_training import BUCKET, data, example, keys, procnode, read_json, secret  # noqa: F401 - fixtures
from tests.integration.test_operator import events_for, wait_phase

pytestmark = [pytest.mark.cluster, pytest.mark.s3, pytest.mark.slow]

FAST = {"baseline": False, "calibration": False, "everySteps": 100, "earlyStopping": None}


def _without_none(spec: dict) -> dict:
    return {k: (_without_none(v) if isinstance(v, dict) else v) for k, v in spec.items() if v is not None}


def test_a_child_waits_for_its_parent_records_its_lineage_and_the_gate_stops_a_worse_model(kubectl, operator, procnode, s3, data, namespace):  # noqa: F811
    secret(kubectl, namespace, s3)
    parent = example("sentiment-classification.yaml", "parent", namespace, s3, hyperparameters={"epochs": None, "maxSteps": 8},
                     evaluation=FAST)
    parent["spec"] = _without_none(parent["spec"])
    child = example("continuous-from-sentiment.yaml", "child", namespace, s3,
                    hyperparameters={"epochs": None, "maxSteps": 3, "learningRate": 0.5, "warmupRatio": 0.0, "maxGradNorm": 100.0},
                    evaluation={**FAST, "useBestModel": False, "regression": {"maxDrop": 0.0, "metric": "accuracy", "action": "fail"}})
    child["spec"]["dataset"]["preprocessing"] = {"redactPii": False, "dedupe": {"near": False}}  # the child's own data: kept cheap
    child["spec"]["model"]["fromJob"]["name"] = "parent"
    child["spec"] = _without_none(child["spec"])
    kubectl.create(parent)
    kubectl.create(child)  # at once: it must wait for the parent, not fail

    parent_status = wait_phase(kubectl, namespace, "parent", "Succeeded", timeout=300)
    child_status = wait_phase(kubectl, namespace, "child", "Failed", timeout=300)
    reasons = [e["reason"] for e in events_for(kubectl, namespace, "child")]
    assert "WaitingForParentJob" in reasons and "JobCreated" in reasons

    # Lineage: the parent's real values, as the parent's trainer wrote them to MinIO.
    run = f"runs/{namespace}/parent"
    lineage = child_status["lineage"]
    assert lineage["parentJob"] == "parent" and lineage["parentUid"] == kubectl.get("ftj", "parent", namespace)["metadata"]["uid"]
    assert lineage["parentModelUri"] == parent_status["modelUri"] == f"s3://{BUCKET}/{run}/model"
    assert lineage["baseModelUri"] == f"s3://{BUCKET}/models/minilm" and lineage["adapters"] == [parent_status["modelUri"]]
    report = s3.client().get_object(Bucket=BUCKET, Key=f"{run}/data-report.json")["Body"].read()
    assert lineage["parentDataReportDigest"] == parent_status["data"]["reportDigest"] == "sha256:" + hashlib.sha256(report).hexdigest()
    assert lineage["parentTestSetUri"] == parent_status["testSetUri"] == f"s3://{BUCKET}/{run}/test-set.parquet"

    # The gate: measured on the parent's test rows against the parent's recorded test accuracy, and it failed the job.
    assert child_status["reason"] == "RegressionDetected" and "RegressionDetected: on the parent's test set accuracy" in child_status["message"]
    regression = child_status["regression"]
    parent_test = read_json(s3, f"{run}/progress.json")["evaluation"]["test"]
    assert regression["parent"] == parent_test["accuracy"] and regression["testRows"] == parent_test["eval_samples"]
    assert regression["passed"] is False and regression["child"] < regression["parent"] and regression["action"] == "fail"
    assert not keys(s3, f"runs/{namespace}/child/model/")  # the worse model is not exported
