"""The reconcile's three steps against a recording fake of the Kubernetes calls: observe (what is read
before deciding), decide once, apply (what is executed)."""

import json

import pytest

from finetune_operator import handlers, kube
from finetune_operator.config import OperatorConfig, OperatorDefaults
from finetune_operator.progress import ProgressReader
from finetune_operator.views import JobView, PodView

CONFIG = OperatorConfig(instance="op-0")


class FakeKube:
    def __init__(self, secret_keys=None):
        self.keys = secret_keys
        self.calls = []

    def install(self, monkeypatch):
        def record(name, result=None):
            def call(*args, **kwargs):
                self.calls.append((name, args, kwargs))
                return result
            return call
        monkeypatch.setattr(kube, "secret_keys", lambda ns, name: self.calls.append(("secret_keys", (ns, name), {})) or self.keys)
        for name in ("patch_status", "post_event", "delete_job", "set_job_suspend", "create_if_absent", "delete_finetunejob"):
            monkeypatch.setattr(kube, name, record(name))

    def named(self, name):
        return [args for n, args, _ in self.calls if n == name]


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setattr(handlers, "_progress_reader", None)  # a fresh reader (cache) per test
    fake = FakeKube()
    fake.install(monkeypatch)
    return fake


def body(tmp_path, status=None, **spec):
    return {
        "metadata": {"name": "ft", "namespace": "ns", "uid": "u-1", "generation": 1, "resourceVersion": "7"},
        "spec": {"model": {"uri": "s3://models/m"}, "dataset": {"train": "s3://data/t"}, "output": {"uri": str(tmp_path)}, **spec},
        "status": status or {},
    }


def reconcile(b, jobs=(), pods=()):
    handlers.reconcile(b, jobs=jobs, pods=pods, config=CONFIG, handler="test")


def test_missing_secret_fails_without_creating_anything(fake, tmp_path):
    reconcile(body(tmp_path, storage={"credentialsSecret": {"name": "s3"}}))
    assert fake.named("secret_keys") == [("ns", "s3")]
    [(ns, name, patch, version)] = fake.named("patch_status")
    assert (ns, name, version, patch["phase"], patch["reason"]) == ("ns", "ft", "7", "Failed", "SecretNotFound")
    assert "kubectl create secret generic s3" in patch["message"]
    assert fake.named("create_if_absent") == []
    [(_, event_type, reason, _message)] = fake.named("post_event")
    assert (event_type, reason) == ("Warning", "SecretNotFound")
    assert [kw for n, _, kw in fake.calls if n == "post_event"] == [{"instance": "op-0"}]


def test_usable_secret_creates_the_attempts_children(fake, tmp_path):
    fake.keys = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    reconcile(body(tmp_path, storage={"credentialsSecret": {"name": "s3"}}))
    created = [args[0] for args in fake.named("create_if_absent")]
    # the NetworkPolicy exists before the Job's pods do
    assert [(o["kind"], o["metadata"]["name"]) for o in created] == [
        ("Service", "ft"), ("ConfigMap", "ft-config"), ("NetworkPolicy", "ft-pods"), ("Job", "ft-0")]
    assert fake.named("patch_status")[0][2]["phase"] == "Pending"


def test_no_network_policy_when_the_chart_turns_it_off(fake, tmp_path, monkeypatch):
    fake.keys = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    off = OperatorConfig(instance="op-0", defaults=OperatorDefaults(network_policy=False))
    handlers.reconcile(body(tmp_path, storage={"credentialsSecret": {"name": "s3"}}), jobs=[], pods=[], config=off, handler="test")
    kinds = [args[0]["kind"] for args in fake.named("create_if_absent")]
    assert kinds == ["Service", "ConfigMap", "Job"]


def test_a_running_job_reads_no_secret(fake, tmp_path):
    status = {"phase": "Running", "reason": "PodsRunning", "attempt": 0, "restarts": 0, "jobName": "ft-0"}
    reconcile(body(tmp_path, status, storage={"credentialsSecret": {"name": "s3"}}),
              jobs=[JobView("ft-0", 0, False, active=1)], pods=[PodView("ft-0-0", 0, 0, "Running")])
    assert fake.named("secret_keys") == [] and fake.named("create_if_absent") == []


def test_a_finished_job_publishes_the_trainers_last_word_with_its_final_status(fake, tmp_path, monkeypatch):
    reader = ProgressReader(credentials=lambda ns, name: None, interval=3600)
    monkeypatch.setattr(handlers, "_progress_reader", reader)
    (tmp_path / "progress.json").write_text(json.dumps({"stage": "training", "step": 30, "totalSteps": 40}))
    reader.read("u-1", "ns", handlers.parse(body(tmp_path))[0], force=True)  # what the reader had while it ran
    (tmp_path / "progress.json").write_text(json.dumps({"stage": "done", "step": 40, "totalSteps": 40, "modelUri": "s3://out/model"}))
    status = {"phase": "Running", "reason": "PodsRunning", "attempt": 0, "restarts": 0, "jobName": "ft-0"}
    reconcile(body(tmp_path, status), jobs=[JobView("ft-0", 0, False, complete=True)])
    [(_, _, patch, _)] = fake.named("patch_status")
    assert patch["phase"] == "Succeeded" and patch["modelUri"] == "s3://out/model"
    assert patch["progress"]["text"] == "40/40 (100.0%)"


def test_a_conflict_rereads_the_object_and_decides_again(fake, tmp_path, monkeypatch):
    attempts = []

    def patch_status(ns, name, patch, version):
        attempts.append(version)
        if version == "7":
            raise kube.Conflict("changed")

    fresh = body(tmp_path)
    fresh["metadata"]["resourceVersion"] = "8"
    monkeypatch.setattr(kube, "patch_status", patch_status)
    monkeypatch.setattr(kube, "get_finetunejob", lambda ns, name: fresh)
    reconcile(body(tmp_path))
    assert attempts == ["7", "8"]
    assert len(fake.named("create_if_absent")) == 4  # executed once, for the fresh object (Service, ConfigMap, NetworkPolicy, Job)
