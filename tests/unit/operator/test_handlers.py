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
        self.labels = None  # the credentials Secret's labels (None: no such Secret)
        self.calls = []
        self.existing = {}  # (kind, name) -> metadata of what the API server already holds

    def install(self, monkeypatch):
        def record(name, result=None):
            def call(*args, **kwargs):
                self.calls.append((name, args, kwargs))
                return result
            return call
        monkeypatch.setattr(kube, "secret_keys", lambda ns, name: self.calls.append(("secret_keys", (ns, name), {})) or self.keys)
        monkeypatch.setattr(kube, "secret_labels", lambda ns, name: self.calls.append(("secret_labels", (ns, name), {})) or self.labels)
        monkeypatch.setattr(kube, "read_meta", lambda kind, ns, name: self.calls.append(("read_meta", (kind, ns, name), {})) or self.existing.get((kind, name)))
        for name in ("patch_status", "post_event", "delete_job", "set_job_suspend", "create_owned", "delete_finetunejob"):
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
    assert fake.named("create_owned") == []
    [(_, event_type, reason, _message)] = fake.named("post_event")
    assert (event_type, reason) == ("Warning", "SecretNotFound")
    assert [kw for n, _, kw in fake.calls if n == "post_event"] == [{"instance": "op-0"}]


def test_usable_secret_creates_the_attempts_children(fake, tmp_path):
    fake.keys = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    reconcile(body(tmp_path, storage={"credentialsSecret": {"name": "s3"}}))
    created = [args[0] for args in fake.named("create_owned")]
    # the NetworkPolicy exists before the Job's pods do
    assert [(o["kind"], o["metadata"]["name"]) for o in created] == [
        ("Service", "ft"), ("ConfigMap", "ft-config"), ("NetworkPolicy", "ft-pods"), ("Job", "ft-0")]
    assert fake.named("patch_status")[0][2]["phase"] == "Pending"


def test_no_network_policy_when_the_chart_turns_it_off(fake, tmp_path, monkeypatch):
    fake.keys = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    off = OperatorConfig(instance="op-0", defaults=OperatorDefaults(network_policy=False))
    handlers.reconcile(body(tmp_path, storage={"credentialsSecret": {"name": "s3"}}), jobs=[], pods=[], config=off, handler="test")
    kinds = [args[0]["kind"] for args in fake.named("create_owned")]
    assert kinds == ["Service", "ConfigMap", "Job"]


def test_a_running_job_reads_no_secret(fake, tmp_path):
    status = {"phase": "Running", "reason": "PodsRunning", "attempt": 0, "restarts": 0, "jobName": "ft-0"}
    reconcile(body(tmp_path, status, storage={"credentialsSecret": {"name": "s3"}}),
              jobs=[JobView("ft-0", 0, False, active=1, uid="j-0", owner_uid="u-1")], pods=[PodView("ft-0-0", 0, 0, "Running", owner_uid="j-0")])
    assert fake.named("secret_keys") == [] and fake.named("create_owned") == []


def test_a_finished_job_publishes_the_trainers_last_word_with_its_final_status(fake, tmp_path, monkeypatch):
    reader = ProgressReader(credentials=lambda ns, name: None, interval=3600)
    monkeypatch.setattr(handlers, "_progress_reader", reader)
    (tmp_path / "progress.json").write_text(json.dumps({"stage": "training", "step": 30, "totalSteps": 40}))
    reader.read("u-1", "ns", handlers.parse(body(tmp_path))[0], force=True)  # what the reader had while it ran
    (tmp_path / "progress.json").write_text(json.dumps({"stage": "done", "step": 40, "totalSteps": 40, "modelUri": "s3://out/model"}))
    status = {"phase": "Running", "reason": "PodsRunning", "attempt": 0, "restarts": 0, "jobName": "ft-0"}
    reconcile(body(tmp_path, status), jobs=[JobView("ft-0", 0, False, complete=True, uid="j-0", owner_uid="u-1")])
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
    assert len(fake.named("create_owned")) == 4  # executed once, for the fresh object (Service, ConfigMap, NetworkPolicy, Job)


def test_children_of_another_uid_are_not_adopted(fake, tmp_path):
    """A deleted-and-recreated FineTuneJob (uid u-1) next to the old one's completed Job (uid u-old)."""
    old_job = JobView("ft-0", 0, False, complete=True, uid="j-old", owner_uid="u-old")
    fake.existing[("Job", "ft-0")] = {"name": "ft-0", "ownerReferences": [{"kind": "FineTuneJob", "name": "ft", "uid": "u-old", "controller": True}]}
    reconcile(body(tmp_path), jobs=[old_job])
    [(_, _, patch, _)] = fake.named("patch_status")
    assert (patch["phase"], patch["reason"]) == ("Pending", "ChildNameConflict")
    assert "Job ft-0 already exists and is controlled by FineTuneJob ft (uid u-old)" in patch["message"]
    assert fake.named("create_owned") == [] and fake.named("delete_job") == []


def test_a_foreign_network_policy_with_our_name_is_a_name_conflict(fake, tmp_path):
    fake.existing[("NetworkPolicy", "ft-pods")] = {"name": "ft-pods"}  # not ours: no owner at all
    reconcile(body(tmp_path))
    [(_, _, patch, _)] = fake.named("patch_status")
    assert (patch["phase"], patch["reason"]) == ("Pending", "ChildNameConflict")
    assert "NetworkPolicy ft-pods" in patch["message"] and fake.named("create_owned") == []


def test_a_foreign_pod_with_our_labels_and_a_failure_message_is_ignored(fake, tmp_path):
    status = {"phase": "Running", "reason": "PodsRunning", "attempt": 0, "restarts": 0, "jobName": "ft-0"}
    mine = JobView("ft-0", 0, False, active=1, uid="j-0", owner_uid="u-1")
    pods = [PodView("ft-0-0", 0, 0, "Running", owner_uid="j-0"),
            PodView("evil", 0, 0, "Failed", exit_code=14, message="UnknownLabel: fake", owner_uid=None),
            PodView("evil-2", 0, 0, "Failed", exit_code=14, message="UnknownLabel: fake", owner_uid="j-other")]
    reconcile(body(tmp_path, status), jobs=[mine], pods=pods)
    [(_, _, patch, _)] = fake.named("patch_status")
    assert patch.get("phase") is None and patch["message"] == "1/1 training pod(s) running"  # still Running
    assert fake.named("delete_job") == [] and fake.named("post_event") == []


def test_a_rejected_child_ends_in_failed_with_the_servers_message(fake, tmp_path, monkeypatch):
    created = []

    def create_owned(obj, uid):
        created.append(obj["kind"])
        if obj["kind"] == "Job":
            raise kube.Rejected("Job", "ft-0", 'Job.batch "ft-0" is invalid: tolerations[0].operator: Unsupported value: "Bogus"')
        return True

    monkeypatch.setattr(kube, "create_owned", create_owned)
    monkeypatch.setattr(kube, "get_finetunejob", lambda ns, name: body(tmp_path, {"phase": "Pending", "reason": "JobCreated", "attempt": 0, "jobName": "ft-0"}))
    reconcile(body(tmp_path))
    assert created == ["Service", "ConfigMap", "NetworkPolicy", "Job"]  # tried once, not again
    first, last = [patch for _, _, patch, _ in fake.named("patch_status")]
    assert first["phase"] == "Pending"
    assert (last["phase"], last["reason"]) == ("Failed", "ChildRejected")
    assert 'Unsupported value: "Bogus"' in last["message"]


class _Api:
    """Stands in for a kubernetes client API object: create raises ``error``, read returns ``existing``."""

    def __init__(self, error, existing=None):
        self.error, self.existing = error, existing

    def create_namespaced_job(self, ns, obj, **_):
        raise self.error

    def read_namespaced_job(self, name, ns):
        from kubernetes import client
        return client.V1Job(metadata=client.V1ObjectMeta(name=name, owner_references=self.existing))


def _api_error(status, message):
    from kubernetes.client.exceptions import ApiException
    err = ApiException(status=status, reason="Unprocessable Entity")
    err.body = json.dumps({"kind": "Status", "message": message})
    return err


JOB = {"kind": "Job", "metadata": {"name": "ft-0", "namespace": "ns"}}


def test_create_owned_turns_422_into_rejected_with_the_servers_message(monkeypatch):
    monkeypatch.setattr(kube, "_batch", lambda: _Api(_api_error(422, 'Job.batch "ft-0" is invalid: metadata.name: Too long')))
    with pytest.raises(kube.Rejected, match='metadata.name: Too long'):
        kube.create_owned(JOB, "u-1")


def test_create_owned_accepts_409_only_for_what_we_control(monkeypatch):
    from kubernetes import client
    ours = [client.V1OwnerReference(api_version="finetune.io/v1alpha1", kind="FineTuneJob", name="ft", uid="u-1", controller=True)]
    theirs = [client.V1OwnerReference(api_version="finetune.io/v1alpha1", kind="FineTuneJob", name="ft", uid="u-old", controller=True)]
    monkeypatch.setattr(kube, "_batch", lambda: _Api(_api_error(409, "exists"), ours))
    assert kube.create_owned(JOB, "u-1") is False
    monkeypatch.setattr(kube, "_batch", lambda: _Api(_api_error(409, "exists"), theirs))
    with pytest.raises(kube.ForeignChild, match=r"controlled by FineTuneJob ft \(uid u-old\)"):
        kube.create_owned(JOB, "u-1")


def test_the_allow_list_refuses_a_job_whose_endpoint_is_not_on_it(fake, tmp_path):
    fake.keys = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    strict = OperatorConfig(instance="op-0", allowed_endpoints=("https://s3.internal:9000",))
    handlers.reconcile(body(tmp_path, storage={"endpoint": "http://169.254.169.254", "credentialsSecret": {"name": "s3"}}),
                       jobs=[], pods=[], config=strict, handler="test")
    [(_, _, patch, _)] = fake.named("patch_status")
    assert (patch["phase"], patch["reason"]) == ("Failed", "EndpointNotAllowed")
    assert "http://169.254.169.254" in patch["message"] and "storage.allowedEndpoints" in patch["message"]
    assert fake.named("create_owned") == []


# ------------------------------------------------------------------- least privilege (finetune_operator.policy)

LABEL = (("finetune.io/credentials", "true"),)


def test_an_unlabelled_secret_fails_the_job_and_its_values_are_never_read(fake, tmp_path):
    fake.keys = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    fake.labels = {"app": "something-else"}
    config = OperatorConfig(instance="op-0", secret_selector=LABEL)
    handlers.reconcile(body(tmp_path, storage={"credentialsSecret": {"name": "s3"}}), jobs=[], pods=[], config=config, handler="test")
    assert fake.named("secret_labels") == [("ns", "s3")]
    assert fake.named("secret_keys") == []  # only the metadata was read
    [(_, _, patch, _)] = fake.named("patch_status")
    assert (patch["phase"], patch["reason"]) == ("Failed", "SecretNotLabelled")
    assert "kubectl -n ns label secret s3 finetune.io/credentials=true" in patch["message"]
    assert fake.named("create_owned") == []
    assert [(t, r) for _, t, r, _ in fake.named("post_event")] == [("Warning", "SecretNotLabelled")]


def test_a_labelled_secret_is_checked_as_before_and_the_job_starts(fake, tmp_path):
    fake.keys = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    fake.labels = {"finetune.io/credentials": "true"}
    config = OperatorConfig(instance="op-0", secret_selector=LABEL)
    handlers.reconcile(body(tmp_path, storage={"credentialsSecret": {"name": "s3"}}), jobs=[], pods=[], config=config, handler="test")
    assert fake.named("secret_labels") == [("ns", "s3")] and fake.named("secret_keys") == [("ns", "s3")]
    assert [o[0]["kind"] for o in fake.named("create_owned")][-1] == "Job"


def test_with_a_selector_a_missing_secret_is_still_secret_not_found(fake, tmp_path):
    config = OperatorConfig(instance="op-0", secret_selector=LABEL)
    handlers.reconcile(body(tmp_path, storage={"credentialsSecret": {"name": "s3"}}), jobs=[], pods=[], config=config, handler="test")
    assert fake.named("patch_status")[0][2]["reason"] == "SecretNotFound" and fake.named("secret_keys") == []


def test_a_namespace_that_has_not_opted_in_gets_nothing_created_and_no_secret_read(fake, tmp_path):
    fake.keys = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    config = OperatorConfig(instance="op-0", namespace_selector=(("finetune.io/enabled", "true"),))
    b = body(tmp_path, storage={"credentialsSecret": {"name": "s3"}})
    handlers.reconcile(b, jobs=[], pods=[], config=config, handler="test", namespace_labels={"kubernetes.io/metadata.name": "ns"})
    assert [n for n, _, _ in fake.calls if n not in ("patch_status", "post_event")] == []  # no Secret, no child name read
    [(_, _, patch, _)] = fake.named("patch_status")
    assert (patch["phase"], patch["reason"]) == ("Pending", "NamespaceNotEnabled")
    fake.calls.clear()
    handlers.reconcile({**b, "status": patch}, jobs=[], pods=[], config=config, handler="test", namespace_labels={"finetune.io/enabled": "true"})
    assert fake.named("secret_keys") == [("ns", "s3")] and [o[0]["kind"] for o in fake.named("create_owned")][-1] == "Job"
    assert fake.named("patch_status")[0][2]["reason"] == "JobCreated"


def test_a_disallowed_image_fails_before_the_secret_is_read(fake, tmp_path):
    fake.keys = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    config = OperatorConfig(instance="op-0", allowed_images=("registry.example.com/",), allowed_priority_classes=("low",))
    handlers.reconcile(body(tmp_path, storage={"credentialsSecret": {"name": "s3"}}, resources={"image": "evil.io/miner:1"}),
                       jobs=[], pods=[], config=config, handler="test")
    [(_, _, patch, _)] = fake.named("patch_status")
    assert (patch["phase"], patch["reason"]) == ("Failed", "ImageNotAllowed") and "evil.io/miner:1" in patch["message"]
    assert fake.named("secret_keys") == [] and fake.named("create_owned") == []
    fake.calls.clear()
    handlers.reconcile(body(tmp_path, resources={"priorityClassName": "system-cluster-critical"}), jobs=[], pods=[], config=config, handler="test")
    assert fake.named("patch_status")[0][2]["reason"] == "PriorityClassNotAllowed" and fake.named("create_owned") == []


def test_the_progress_reader_reads_only_labelled_secrets(monkeypatch):
    read = []
    monkeypatch.setattr(kube, "read_secret", lambda ns, name: read.append((ns, name)) or "the secret")
    labels = {"s3": {"finetune.io/credentials": "true"}, "other": {}}
    monkeypatch.setattr(kube, "secret_labels", lambda ns, name: labels.get(name))
    reader = handlers.secret_reader(LABEL)
    assert reader("ns", "s3") == "the secret"
    assert reader("ns", "other") is None and reader("ns", "missing") is None
    assert read == [("ns", "s3")]
    assert handlers.secret_reader(()) is kube.read_secret


def test_a_secret_the_operator_may_not_read_fails_the_job_with_what_to_grant(fake, tmp_path, monkeypatch):
    def forbidden(ns, name):
        raise kube.SecretForbidden('secrets "s3" is forbidden')
    monkeypatch.setattr(kube, "secret_keys", forbidden)
    reconcile(body(tmp_path, storage={"credentialsSecret": {"name": "s3"}}))
    [(_, _, patch, _)] = fake.named("patch_status")
    assert (patch["phase"], patch["reason"]) == ("Failed", "SecretForbidden")
    assert "namespace ns" in patch["message"] and "rbac.credentialsNamespaces" in patch["message"]
    assert fake.named("create_owned") == []


def test_secret_reads_turn_403_into_secret_forbidden(monkeypatch):
    from kubernetes.client.exceptions import ApiException

    class Core:
        def read_namespaced_secret(self, name, ns):
            raise ApiException(status=403, reason="Forbidden")

    monkeypatch.setattr(kube, "_core", Core)
    with pytest.raises(kube.SecretForbidden):
        kube.secret_keys("ns", "s3")
