"""spec.tracking on the operator's side: the MLflow credentials reach the pods only as secretKeyRefs, the
MLflow URI is held to the allowed endpoints like storage.endpoint, its Secret to the storage Secret's
label rule, and the trainer's tracking summary reaches the status."""

from __future__ import annotations

import json

import pytest

from finetune_api.documents import ProgressDocument
from finetune_api.spec import parse_spec
from finetune_operator import builders, handlers, kube
from finetune_operator.config import OperatorConfig
from finetune_operator.progress import project

BASE = {"model": {"uri": "s3://models/m"}, "dataset": {"train": "s3://data/t"}}
MLFLOW = {"uri": "https://mlflow.internal:5000", "experiment": "team-a", "registerModel": "support-bot",
          "credentialsSecret": {"name": "mlflow-creds"}}
LABEL = (("finetune.io/credentials", "true"),)


def test_mlflow_credentials_only_by_optional_secret_reference():
    spec = parse_spec({**BASE, "output": {"uri": "s3://out/r"}, "tracking": {"mlflow": MLFLOW}})
    job = builders.build_job(builders.Owner(name="ft", namespace="ns", uid="u"), spec, 0, builders.OperatorDefaults())
    env = {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        assert env[key] == {"name": key, "valueFrom": {"secretKeyRef": {"name": "mlflow-creds", "key": key, "optional": True}}}
    # The trainer reads the URI from the job config, which carries no credentials.
    config = builders.render_trainer_config(builders.Owner(name="ft", namespace="ns", uid="u"), spec)
    assert "https://mlflow.internal:5000" in config and "MLFLOW_TRACKING_PASSWORD" not in config


def test_no_mlflow_no_mlflow_variables():
    spec = parse_spec({**BASE, "output": {"uri": "s3://out/r"}})
    assert spec.tracking.tensorboard is True and spec.tracking.mlflow is None
    job = builders.build_job(builders.Owner(name="ft", namespace="ns", uid="u"), spec, 0, builders.OperatorDefaults())
    assert not [e for e in job["spec"]["template"]["spec"]["containers"][0]["env"] if e["name"].startswith("MLFLOW_")]


class _Secrets:
    """The two Secrets of a job as the API server would answer metadata and key reads."""

    def __init__(self, monkeypatch, labels):
        self.labels, self.calls = labels, []
        monkeypatch.setattr(kube, "secret_labels", lambda ns, name: self.calls.append(("labels", name)) or self.labels.get(name))
        monkeypatch.setattr(kube, "secret_keys", lambda ns, name: self.calls.append(("keys", name)) or {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"})
        monkeypatch.setattr(kube, "read_meta", lambda *a: None)
        self.patches, self.created = [], []
        monkeypatch.setattr(kube, "patch_status", lambda ns, name, patch, version: self.patches.append(patch))
        monkeypatch.setattr(kube, "create_owned", lambda obj, *a, **k: self.created.append(obj["kind"]))
        for name in ("post_event", "delete_job", "set_job_suspend", "delete_finetunejob"):
            monkeypatch.setattr(kube, name, lambda *a, **k: None)


def _reconcile(tmp_path, config, **tracking):
    body = {"metadata": {"name": "ft", "namespace": "ns", "uid": "u-1", "generation": 1, "resourceVersion": "7"},
            "spec": {**BASE, "output": {"uri": str(tmp_path)}, "storage": {"credentialsSecret": {"name": "s3"}}, "tracking": tracking},
            "status": {}}
    handlers.reconcile(body, jobs=[], pods=[], config=config, handler="test")


@pytest.fixture(autouse=True)
def _fresh_reader(monkeypatch):
    monkeypatch.setattr(handlers, "_progress_reader", None)


def test_the_mlflow_uri_is_held_to_the_allowed_endpoints(tmp_path, monkeypatch):
    secrets = _Secrets(monkeypatch, {"s3": {}, "mlflow-creds": {}})
    strict = OperatorConfig(instance="op-0", allowed_endpoints=("aws", "https://mlflow.internal:5000"))
    _reconcile(tmp_path, strict, mlflow={**MLFLOW, "uri": "http://169.254.169.254/latest"})
    [patch] = secrets.patches
    assert (patch["phase"], patch["reason"]) == ("Failed", "EndpointNotAllowed")
    assert patch["message"].startswith("tracking.mlflow.uri http://169.254.169.254/latest is not one of the operator's allowed endpoints")
    assert "storage.allowedEndpoints" in patch["message"] and secrets.created == []

    secrets.patches.clear()
    _reconcile(tmp_path, strict, mlflow=MLFLOW)  # a path on an allowed origin is fine
    assert secrets.patches[0]["phase"] == "Pending" and secrets.created[-1] == "Job"


def test_the_mlflow_secret_must_exist_and_carry_the_storage_secret_labels(tmp_path, monkeypatch):
    config = OperatorConfig(instance="op-0", secret_selector=LABEL)
    secrets = _Secrets(monkeypatch, {"s3": dict(LABEL), "mlflow-creds": {"app": "x"}})
    _reconcile(tmp_path, config, mlflow=MLFLOW)
    [patch] = secrets.patches
    assert (patch["phase"], patch["reason"]) == ("Failed", "SecretNotLabelled")
    assert patch["message"].startswith("tracking.mlflow.credentialsSecret 'mlflow-creds' in namespace ns lacks the label(s)")
    assert ("keys", "mlflow-creds") not in secrets.calls and secrets.created == []  # only its metadata was read

    secrets.patches.clear()
    del secrets.labels["mlflow-creds"]
    _reconcile(tmp_path, OperatorConfig(instance="op-0"), mlflow=MLFLOW)
    assert secrets.patches[0]["reason"] == "SecretNotFound"
    assert "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN" in secrets.patches[0]["message"]

    secrets.patches.clear()
    secrets.labels["mlflow-creds"] = dict(LABEL)
    _reconcile(tmp_path, config, mlflow=MLFLOW)
    assert secrets.patches[0]["phase"] == "Pending" and secrets.created[-1] == "Job"


def test_the_tracking_summary_reaches_the_status():
    doc = ProgressDocument.model_validate(json.loads(json.dumps({
        "stage": "done", "tracking": {"tensorboardUri": "s3://out/r/tensorboard", "mlflowRunId": "abc", "mlflowExperimentId": "3",
                                      "mlflowModelVersion": "2", "problem": "mlflow: finish failed: ConnectionError"}})))
    assert project(doc)["tracking"] == {"tensorboardUri": "s3://out/r/tensorboard", "mlflowRunId": "abc", "mlflowExperimentId": "3",
                                        "mlflowModelVersion": "2", "problem": "mlflow: finish failed: ConnectionError"}
    assert "tracking" not in project(ProgressDocument())
