"""A job claims its output by namespace/name (issue 9 §5): a second job on the same output fails with
OutputClaimed instead of deleting or resuming the first one's checkpoints. On local paths and S3 (moto)."""

from __future__ import annotations

import boto3
import pytest
from moto import mock_aws

from finetune_api import env as pod_env
from finetune_api.failures import BY_REASON, find_termination_line
from finetune_trainer.config import parse_document
from finetune_trainer.errors import OutputClaimed
from finetune_trainer.output_claim import CLAIM_MARKER, claim_output, claim_output_from_env
from finetune_trainer.storage import Storage, join

FIRST = {"uid": "uid-1", "name": "first", "namespace": "team-a"}
SECOND = {"uid": "uid-2", "name": "second", "namespace": "team-b"}


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path, monkeypatch):
    if request.param == "local":
        yield str(tmp_path / "out")
        return
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for var in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    with mock_aws():
        boto3.client("s3", region_name="us-east-1").create_bucket(Bucket="runs")
        yield "s3://runs/shared"


def test_the_first_job_claims_and_every_attempt_of_it_goes_on(output):
    storage = Storage()
    claim = claim_output(storage, output, FIRST)
    assert (claim["uid"], claim["name"], claim["namespace"]) == ("uid-1", "first", "team-a") and claim["claimedAt"]
    assert storage.read_json(join(output, CLAIM_MARKER))["uid"] == "uid-1"
    assert claim_output(storage, output, FIRST)["claimedAt"] == claim["claimedAt"]  # the next attempt: same claim


def test_a_second_job_on_the_same_output_fails_and_touches_nothing(output):
    storage = Storage()
    claim_output(storage, output, FIRST)
    checkpoint = join(output, "checkpoints", "step-00000010", "manifest.json")
    storage.write_json(checkpoint, {"step": 10})
    with pytest.raises(OutputClaimed) as err:
        claim_output(storage, output, SECOND)
    line = err.value.line()
    assert line.startswith("OutputClaimed: spec.output.uri ") and "FineTuneJob team-a/first (uid uid-1)" in line
    assert find_termination_line(line)[0] is BY_REASON["OutputClaimed"] and BY_REASON["OutputClaimed"].permanent
    assert storage.read_json(checkpoint) == {"step": 10}  # the first job's checkpoint is still there
    assert storage.read_json(join(output, CLAIM_MARKER))["uid"] == "uid-1"


def test_losing_the_race_to_write_the_marker_still_fails(output, monkeypatch):
    """Both jobs saw no marker; the second one's conditional write loses and it reads the winner's."""
    storage = Storage()
    from finetune_trainer import output_claim as storage_module

    real_read = storage_module._read_claim
    calls = []

    def read_claim(st, marker):
        calls.append(marker)
        if len(calls) == 1:  # the second job's first look: nothing there yet, then the first job writes
            claim_output(st, output, FIRST)
            return None
        return real_read(st, marker)

    monkeypatch.setattr(storage_module, "_read_claim", read_claim)
    with pytest.raises(OutputClaimed, match="uid uid-1"):
        claim_output(storage, output, SECOND)


def test_the_pod_claims_with_the_uid_the_operator_sets(tmp_path, monkeypatch):
    config = parse_document({"kind": "FineTuneJob", "metadata": {"name": "ft"}, "spec": {
        "model": {"uri": "/models/m"}, "dataset": {"train": "/data/t.jsonl"}, "output": {"uri": str(tmp_path / "out")}}}, "x")
    monkeypatch.delenv(pod_env.JOB_UID, raising=False)
    assert claim_output_from_env(config) is None and not (tmp_path / "out").exists()  # outside Kubernetes
    monkeypatch.setenv(pod_env.JOB_UID, "uid-9")
    monkeypatch.setenv(pod_env.NAMESPACE, "ns")
    assert claim_output_from_env(config)["uid"] == "uid-9"
    # the same namespace/name deleted and re-created (a new uid) is the same run: it goes on
    monkeypatch.setenv(pod_env.JOB_UID, "uid-10")
    assert claim_output_from_env(config)["uid"] == "uid-9"
    # the same name in another namespace is another tenant's job
    monkeypatch.setenv(pod_env.NAMESPACE, "other-team")
    with pytest.raises(OutputClaimed, match="FineTuneJob ns/ft"):
        claim_output_from_env(config)
