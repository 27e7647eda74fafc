"""The chart's least-privilege restrictions (finetune_operator.policy) and how the state machine turns
their refusals into a job's status: pure logic, no API."""

import pytest
from pydantic import ValidationError

from finetune_api.failures import BY_REASON, REFUSALS
from finetune_api.spec import parse_spec
from finetune_operator import builders, policy
from finetune_operator.config import OperatorConfig, OperatorDefaults
from finetune_operator.state import Observed, decide

BASE = {"model": {"uri": "s3://models/m"}, "dataset": {"train": "s3://data/t.jsonl"}, "output": {"uri": "s3://out/x"}}
DEFAULT_IMAGE = "ghcr.io/finetune-operator/trainer:0.1.0"


def spec(**resources):
    return parse_spec({**BASE, "resources": resources})


@pytest.mark.parametrize("image,allowed,expected", [
    ("anything:1", (), True),  # empty: any image
    ("registry.example.com/ml/trainer:1", ("registry.example.com/ml",), True),
    ("registry.example.com/ml:1", ("registry.example.com/ml",), True),
    ("registry.example.com/ml@sha256:abc", ("registry.example.com/ml",), True),
    ("registry.example.com/ml", ("registry.example.com/ml",), True),
    ("registry.example.com/ml-evil/trainer:1", ("registry.example.com/ml",), False),  # a prefix ends at a boundary
    ("registry.example.com.evil.io/ml/x", ("registry.example.com",), False),
    ("registry.example.com/team/x:1", ("registry.example.com/",), True),
    ("evil.io/registry.example.com/x", ("registry.example.com/",), False),
    ("registry.example.com/ml/trainer:1.2", ("registry.example.com/ml/trainer:1.*",), True),  # glob
    ("registry.example.com/ml/trainer:2.0", ("registry.example.com/ml/trainer:1.*",), False),
    ("registry.example.com/a/b/c:1", ("registry.example.com/*",), True),  # * crosses /
    ("python:3", ("docker.io/library/python",), False),  # matched as written, no normalisation
    ("other.io/x", ("registry.example.com/", "other.io/"), True),
])
def test_image_allowed(image, allowed, expected):
    assert policy.image_allowed(image, allowed) is expected


@pytest.mark.parametrize("bad", ["", " registry.example.com/", "a b"])
def test_a_malformed_image_entry_is_refused_at_startup(bad):
    with pytest.raises(ValueError):
        policy.check_image_patterns([bad])
    policy.check_image_patterns(["registry.example.com/", "ghcr.io/*"])


def test_an_image_outside_the_list_is_refused_with_what_to_do():
    reason, message = policy.pod_spec_refusal(spec(image="evil.io/miner:1"), default_image=DEFAULT_IMAGE,
                                              allowed_images=("registry.example.com/",), allowed_priority_classes=())
    assert reason == "ImageNotAllowed"
    assert "'evil.io/miner:1'" in message and "registry.example.com/" in message and "trainer.allowedImages" in message


def test_the_default_image_and_an_unset_image_are_always_allowed():
    kw = {"default_image": DEFAULT_IMAGE, "allowed_images": ("registry.example.com/",), "allowed_priority_classes": ()}
    assert policy.pod_spec_refusal(spec(), **kw) is None
    assert policy.pod_spec_refusal(spec(image=DEFAULT_IMAGE), **kw) is None
    assert policy.pod_spec_refusal(spec(image="registry.example.com/t:1"), **kw) is None


def test_priority_classes():
    kw = {"default_image": DEFAULT_IMAGE, "allowed_images": ()}
    reason, message = policy.pod_spec_refusal(spec(priorityClassName="system-node-critical"), allowed_priority_classes=("batch-low",), **kw)
    assert reason == "PriorityClassNotAllowed" and "'system-node-critical'" in message and "batch-low" in message
    assert policy.pod_spec_refusal(spec(priorityClassName="batch-low"), allowed_priority_classes=("batch-low",), **kw) is None
    assert policy.pod_spec_refusal(spec(), allowed_priority_classes=("batch-low",), **kw) is None  # none asked: the cluster default
    assert policy.pod_spec_refusal(spec(priorityClassName="system-node-critical"), allowed_priority_classes=(), **kw) is None


def test_secret_and_namespace_labels():
    selector = (("finetune.io/credentials", "true"),)
    assert policy.secret_refusal("ns", "s3", {"finetune.io/credentials": "true", "x": "y"}, selector) is None
    for labels in ({}, None, {"finetune.io/credentials": "yes"}):
        reason, message = policy.secret_refusal("ns", "s3", labels, selector)
        assert reason == "SecretNotLabelled"
        assert "kubectl -n ns label secret s3 finetune.io/credentials=true" in message and "not read" in message
    assert policy.secret_refusal("ns", "s3", {}, ()) is None  # no selector: any Secret
    ns_selector = (("finetune.io/enabled", "true"),)
    assert policy.namespace_refusal("team-a", {"finetune.io/enabled": "true"}, ns_selector) is None
    why = policy.namespace_refusal("kube-system", {"kubernetes.io/metadata.name": "kube-system"}, ns_selector)
    assert "kube-system" in why and "kubectl label namespace kube-system finetune.io/enabled=true" in why
    assert policy.namespace_refusal("anything", None, ()) is None


def test_the_chart_settings_reach_the_config():
    config = OperatorConfig.from_env({
        "FINETUNE_NAMESPACE_SELECTOR": "finetune.io/enabled=true",
        "FINETUNE_CREDENTIALS_SECRET_LABELS": "finetune.io/credentials=true,team=a",
        "FINETUNE_ALLOWED_IMAGES": "registry.example.com/ml, ghcr.io/org/*",
        "FINETUNE_ALLOWED_PRIORITY_CLASSES": "batch-low,batch-high",
    })
    assert config.namespace_selector == (("finetune.io/enabled", "true"),)
    assert config.secret_selector == (("finetune.io/credentials", "true"), ("team", "a"))
    assert config.allowed_images == ("registry.example.com/ml", "ghcr.io/org/*")
    assert config.allowed_priority_classes == ("batch-low", "batch-high")
    off = OperatorConfig.from_env({})
    assert (off.namespace_selector, off.secret_selector, off.allowed_images, off.allowed_priority_classes) == ((), (), (), ())


def test_refusal_reasons_are_one_catalogue_apart_from_the_trainers():
    names = [r.reason for r in REFUSALS]
    assert len(set(names)) == len(names) and not set(names) & set(BY_REASON)


def _obs(**kw):
    return Observed(name="ft", namespace="ns", generation=1, status={}, spec=parse_spec(BASE), **kw)


def test_a_refused_image_fails_the_job_before_anything_is_created():
    plan = decide(_obs(policy_refused=("ImageNotAllowed", "spec.resources.image 'x' is not allowed")))
    assert (plan.status["phase"], plan.status["reason"], plan.create_job) == ("Failed", "ImageNotAllowed", None)
    assert plan.events == [("Warning", "ImageNotAllowed", "spec.resources.image 'x' is not allowed")]
    assert not plan.read_final_progress


def test_a_namespace_that_has_not_opted_in_waits_pending_then_goes_on_once_labelled():
    plan = decide(_obs(namespace_refused="namespace ns lacks the label(s) finetune.io/enabled=true"))
    assert (plan.status["phase"], plan.status["reason"], plan.create_job) == ("Pending", "NamespaceNotEnabled", None)
    assert plan.events[0][:2] == ("Warning", "NamespaceNotEnabled")
    again = decide(Observed(name="ft", namespace="ns", generation=1, status=plan.status, spec=parse_spec(BASE),
                            namespace_refused=plan.status["message"]))
    assert again.events == [] and again.create_job is None  # one Warning, not one per resync
    labelled = decide(Observed(name="ft", namespace="ns", generation=1, status=plan.status, spec=parse_spec(BASE)))
    assert labelled.create_job == 0 and labelled.status["reason"] == "JobCreated"


# --------------------------------------------------------------- a FineTuneJob never picks a ServiceAccount


@pytest.mark.parametrize("where,field", [
    ((), "serviceAccountName"), ((), "serviceAccount"), ((), "podTemplate"),
    (("resources",), "serviceAccountName"), (("resources",), "automountServiceAccountToken"),
    (("resources",), "podTemplate"), (("resources",), "securityContext"), (("resources",), "volumes"),
])
def test_the_spec_has_no_way_to_pick_a_service_account_or_override_the_pod(where, field):
    doc = {**BASE, "resources": {}}
    target = doc
    for key in where:
        target = target[key]
    target[field] = "operator" if "Name" in field or field == "serviceAccount" else {"x": 1}
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        parse_spec(doc)


def test_training_pods_never_get_a_service_account_token_whatever_the_spec_holds():
    hostile = parse_spec({**BASE, "resources": {
        "nodes": 2, "image": "registry.example.com/t:1", "priorityClassName": "high",
        "nodeSelector": {"serviceAccountName": "operator"},
        "tolerations": [{"key": "serviceAccountName", "operator": "Exists"}],
        "affinity": {"serviceAccountName": "operator", "automountServiceAccountToken": True},
        "env": [{"name": "KUBERNETES_SERVICE_HOST", "value": "10.0.0.1"}],
        "imagePullSecrets": [{"name": "regcred"}]}})
    owner = builders.Owner(name="ft", namespace="ns", uid="u", generation=1)
    pod = builders.build_job(owner, hostile, 0, OperatorDefaults())["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert "serviceAccountName" not in pod and "serviceAccount" not in pod  # the namespace's default ServiceAccount
    # what the tenant wrote stays inside the fields it was written in
    assert pod["affinity"] == {"serviceAccountName": "operator", "automountServiceAccountToken": True}
    assert not any("serviceaccount" in str(v.get("projected", "")).lower() for v in pod["volumes"])
