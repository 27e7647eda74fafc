"""Outputs are isolated (issue 9 §5), end to end: the operator passes the job's uid to the trainer
(FINETUNE_JOB_UID), the trainer claims its output in MinIO before touching it, and a second
FineTuneJob on the same output fails OutputClaimed without deleting the first one's objects."""

from __future__ import annotations

import pytest

import os

from tests.integration.conftest import ROOT
from tests.integration.test_e2e_training import BUCKET, data, example, keys, procnode, read_json, secret  # noqa: F401 (fixtures)
from tests.integration.test_operator import wait_phase

pytestmark = [pytest.mark.cluster, pytest.mark.s3, pytest.mark.slow]
# The process node runs pods with the pod's env only: point the trainer at this checkout's code (not
# whatever the interpreter has installed), so the claim under test is the one that runs.
THIS_CODE = {"env": [{"name": "PYTHONPATH", "value": os.pathsep.join(str(ROOT / d) for d in ("operator", "trainer-image"))}]}


def _job(name, namespace, s3, uri, **overrides):
    manifest = example("sentiment-classification.yaml", name, namespace, s3, output={"uri": uri}, **overrides)
    manifest["spec"]["resources"].update(THIS_CODE)
    return manifest


def test_a_second_job_on_a_claimed_output_fails_and_leaves_it_alone(kubectl, operator, procnode, s3, data, namespace):  # noqa: F811
    secret(kubectl, namespace, s3)
    shared = f"runs/{namespace}/shared"
    missing = {"train": f"s3://{BUCKET}/datasets/nope/train.jsonl"}
    first = _job("first", namespace, s3, f"s3://{BUCKET}/{shared}", dataset=missing)
    kubectl.create(first)
    st = wait_phase(kubectl, namespace, "first", "Failed", timeout=300)
    assert st["reason"] == "DatasetNotFound"  # it claimed the output first, then looked for its data
    first_uid = kubectl.get("ftj", "first", namespace)["metadata"]["uid"]
    claim = read_json(s3, f"{shared}/.finetune-claim.json")
    assert (claim["uid"], claim["name"], claim["namespace"]) == (first_uid, "first", namespace)
    s3.client().put_object(Bucket=BUCKET, Key=f"{shared}/checkpoints/step-00000010/manifest.json", Body=b"{}")

    second = _job("second", namespace, s3, f"s3://{BUCKET}/{shared}")
    kubectl.create(second)
    st = wait_phase(kubectl, namespace, "second", "Failed", timeout=300)
    assert st["reason"] == "OutputClaimed" and st["restarts"] == 0
    assert f"FineTuneJob {namespace}/first (uid {first_uid})" in st["message"]
    assert f"{shared}/checkpoints/step-00000010/manifest.json" in keys(s3, shared)
    assert read_json(s3, f"{shared}/.finetune-claim.json")["uid"] == first_uid
