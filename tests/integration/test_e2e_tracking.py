"""End to end with spec.tracking: examples/sentiment-tracked.yaml through the operator and the process
node, logging to a real MLflow server (artifacts in MinIO) and writing TensorBoard events to the output
in MinIO. The MLflow credentials go in a Secret and must not show up in the status or the pod's log."""

from __future__ import annotations

import json
import os

import pytest

from tests.integration.conftest import ROOT
from tests.integration.test_e2e_training import BUCKET, data, example, keys, procnode, secret  # noqa: F401 (fixtures)
from tests.integration.test_operator import wait_phase

pytestmark = [pytest.mark.cluster, pytest.mark.s3, pytest.mark.slow]
# The process node runs pods with the pod's env only: point the trainer at this checkout's code.
THIS_CODE = {"name": "PYTHONPATH", "value": os.pathsep.join(str(ROOT / d) for d in ("operator", "trainer-image"))}
PASSWORD = "e2e-mlflow-pass-9f3c"


def test_tracked_job_logs_one_mlflow_run_registers_its_model_and_writes_tensorboard(kubectl, operator, procnode, s3, data,  # noqa: F811
                                                                                    namespace, mlflow_server):
    from mlflow.tracking import MlflowClient

    secret(kubectl, namespace, s3)
    kubectl.run("create", "secret", "generic", "mlflow-credentials", "-n", namespace,
                "--from-literal=MLFLOW_TRACKING_USERNAME=e2e", f"--from-literal=MLFLOW_TRACKING_PASSWORD={PASSWORD}")
    manifest = example("sentiment-tracked.yaml", "tracked", namespace, s3)
    registered = f"sentiment-{namespace}"
    manifest["spec"]["tracking"]["mlflow"].update(uri=mlflow_server.url, experiment=None, registerModel=registered,
                                                  credentialsSecret={"name": "mlflow-credentials"})
    manifest["spec"]["tracking"]["mlflow"] = {k: v for k, v in manifest["spec"]["tracking"]["mlflow"].items() if v is not None}
    manifest["spec"]["resources"]["env"] = [THIS_CODE]
    kubectl.create(manifest)
    st = wait_phase(kubectl, namespace, "tracked", "Succeeded", timeout=300)

    tracking = st["tracking"]
    assert "problem" not in tracking, tracking
    assert tracking["tensorboardUri"] == f"s3://{BUCKET}/runs/{namespace}/tracked/tensorboard"
    assert any("tfevents" in k for k in keys(s3, f"runs/{namespace}/tracked/tensorboard/"))
    client = MlflowClient(tracking_uri=mlflow_server.url)
    run = client.get_run(tracking["mlflowRunId"])
    # One run in the experiment named after the namespace (the default), finished, with every step's loss.
    assert client.get_experiment(run.info.experiment_id).name == namespace
    assert run.info.status == "FINISHED" and run.data.tags["finetune.job"] == "tracked"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == list(range(1, st["progress"]["step"] + 1))
    (version,) = client.search_model_versions(f"name='{registered}'")
    assert (version.source, version.run_id, tracking["mlflowModelVersion"]) == (st["modelUri"], run.info.run_id, version.version)
    # The password reached the pod as a secretKeyRef only.
    job = kubectl.items("jobs", namespace, "finetune.io/job=tracked")[0]
    env = {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-credentials", "key": "MLFLOW_TRACKING_PASSWORD", "optional": True}
    assert PASSWORD not in json.dumps(st) + json.dumps(job)
    logs = [p.read_text(errors="replace") for p in procnode.workdir.rglob("container.log")]
    assert logs and not any(PASSWORD in text for text in logs)
