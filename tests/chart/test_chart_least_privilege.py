"""The chart's least-privilege values (namespaceSelector, storage.credentialsSecretLabels,
trainer.allowedImages, trainer.allowedPriorityClasses) reach the operator as the settings
:class:`finetune_operator.config.OperatorConfig` reads; bad entries fail at ``helm template``; and the
RBAC the secure modes leave is what the README says."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from finetune_api.spec import parse_spec
from finetune_operator.config import OperatorConfig
from finetune_operator.policy import image_allowed, pod_spec_refusal
from test_chart import (CLUSTER_RULES, NAMESPACED_RULES, _render_notes, env_of, helm, of_kind, one, render,  # noqa: F401
                        render_raw, rule_map)

KEYS = ("FINETUNE_NAMESPACE_SELECTOR", "FINETUNE_CREDENTIALS_SECRET_LABELS", "FINETUNE_ALLOWED_IMAGES", "FINETUNE_ALLOWED_PRIORITY_CLASSES")
BASE = {"model": {"uri": "s3://models/m"}, "dataset": {"train": "s3://data/t.jsonl"}, "output": {"uri": "s3://out/x"}}


def test_defaults_restrict_nothing(helm: str) -> None:
    env = env_of(render(helm))
    assert not set(KEYS) & set(env)
    config = OperatorConfig.from_env(env)
    assert (config.namespace_selector, config.secret_selector, config.allowed_images, config.allowed_priority_classes) == ((), (), (), ())


def test_the_secure_mode_flows_into_the_operator_config(helm: str) -> None:
    values = {
        "namespaceSelector": {"finetune.io/enabled": "true"},
        "storage": {"credentialsSecretLabels": {"finetune.io/credentials": "true", "team": "ml"}},
        "trainer": {"allowedImages": ["registry.example.com/ml", "ghcr.io/org/trainer:*"],
                    "allowedPriorityClasses": ["batch-low", "batch-high"]},
    }
    docs = render(helm, values)
    env = env_of(docs)
    assert env["FINETUNE_NAMESPACE_SELECTOR"] == "finetune.io/enabled=true"
    assert env["FINETUNE_CREDENTIALS_SECRET_LABELS"] == "finetune.io/credentials=true,team=ml"
    config = OperatorConfig.from_env(env)
    assert config.namespace_selector == (("finetune.io/enabled", "true"),)
    assert config.secret_selector == (("finetune.io/credentials", "true"), ("team", "ml"))
    assert config.allowed_images == ("registry.example.com/ml", "ghcr.io/org/trainer:*")
    assert config.allowed_priority_classes == ("batch-low", "batch-high")
    assert image_allowed("ghcr.io/org/trainer:1.2", config.allowed_images)
    assert not image_allowed("registry.example.com/ml-evil/x", config.allowed_images)
    # the chart's own default trainer image stays allowed whatever the list holds
    default = config.defaults.trainer_image
    assert pod_spec_refusal(parse_spec({**BASE, "resources": {"image": default}}), default_image=default,
                            allowed_images=config.allowed_images, allowed_priority_classes=config.allowed_priority_classes) is None
    # the operator's RBAC is unchanged: these values narrow what it does, not what its token may do
    assert rule_map(one(docs, "ClusterRole")["rules"]) == {**CLUSTER_RULES, **NAMESPACED_RULES}


def test_with_watch_namespaces_no_secret_is_readable_outside_them(helm: str) -> None:
    docs = render(helm, {"watchNamespaces": ["team-a"], "storage": {"credentialsSecretLabels": {"finetune.io/credentials": "true"}}})
    assert ("", "secrets") not in rule_map(one(docs, "ClusterRole")["rules"])
    [role] = of_kind(docs, "Role")
    assert role["metadata"]["namespace"] == "team-a" and rule_map(role["rules"])[("", "secrets")] == {"get"}


@pytest.mark.parametrize("values,message", [
    ({"trainer": {"allowedImages": [""]}}, "/trainer/allowedImages/0"),
    ({"trainer": {"allowedImages": ["registry.example.com/a b"]}}, "/trainer/allowedImages/0"),
    ({"trainer": {"allowedImages": ["a,b"]}}, "/trainer/allowedImages/0"),
    ({"trainer": {"allowedPriorityClasses": ["Not_A_Name"]}}, "/trainer/allowedPriorityClasses/0"),
    ({"trainer": {"allowedImage": []}}, "allowedImage"),
    ({"namespaceSelector": {"bad key!": "x"}}, "invalid propertyName 'bad key!'"),
    ({"namespaceSelector": ["finetune.io/enabled=true"]}, "/namespaceSelector"),
    ({"storage": {"credentialsSecretLabels": {"finetune.io/credentials": True}}}, "/storage/credentialsSecretLabels"),
])
def test_schema_rejects_bad_least_privilege_settings(helm: str, values: dict[str, Any], message: str) -> None:
    proc = render_raw(helm, values)
    assert proc.returncode != 0 and "schema" in proc.stderr and message in proc.stderr, proc.stderr


def test_secrets_can_be_granted_per_namespace_instead_of_cluster_wide(helm: str) -> None:
    docs = render(helm, {"rbac": {"clusterWideSecrets": False, "credentialsNamespaces": ["team-a", "team-b"]}})
    roles = {r["metadata"]["name"]: r for r in of_kind(docs, "ClusterRole")}
    main, credentials = roles["ftop-finetune-operator"], roles["ftop-finetune-operator-credentials"]
    without_secrets = {k: v for k, v in {**CLUSTER_RULES, **NAMESPACED_RULES}.items() if k != ("", "secrets")}
    assert rule_map(main["rules"]) == without_secrets
    assert rule_map(credentials["rules"]) == {("", "secrets"): {"get"}}
    [cluster_binding] = of_kind(docs, "ClusterRoleBinding")
    assert cluster_binding["roleRef"]["name"] == "ftop-finetune-operator"  # the credentials role is bound per namespace only
    bindings = {b["metadata"]["namespace"]: b for b in of_kind(docs, "RoleBinding")}
    assert set(bindings) == {"team-a", "team-b"}
    sa = one(docs, "ServiceAccount")["metadata"]["name"]
    for binding in bindings.values():
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "ftop-finetune-operator-credentials"}
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": "finetune-system"}]
    # the default stays one ClusterRole with Secrets in it
    assert [r["metadata"]["name"] for r in of_kind(render(helm), "ClusterRole")] == ["ftop-finetune-operator"]


@pytest.mark.parametrize("values", [
    {"rbac": {"credentialsNamespaces": ["team-a"]}},  # clusterWideSecrets still true
    {"rbac": {"clusterWideSecrets": False, "credentialsNamespaces": ["team-a"]}, "watchNamespaces": ["team-a"]},
])
def test_credentials_namespaces_without_per_namespace_secrets_is_refused(helm: str, values: dict[str, Any]) -> None:
    proc = render_raw(helm, values)
    assert proc.returncode != 0 and "rbac.credentialsNamespaces needs" in proc.stderr, proc.stderr


def test_watch_namespaces_keep_secrets_in_their_roles_whatever_cluster_wide_secrets_says(helm: str) -> None:
    docs = render(helm, {"watchNamespaces": ["team-a"], "rbac": {"clusterWideSecrets": False}})
    assert [r["metadata"]["name"] for r in of_kind(docs, "ClusterRole")] == ["ftop-finetune-operator"]
    [role] = of_kind(docs, "Role")
    assert rule_map(role["rules"]) == NAMESPACED_RULES


def test_notes_label_the_secret_and_say_how_to_opt_in(helm: str, tmp_path: Path) -> None:
    plain = _render_notes(helm, tmp_path / "plain")
    assert "kubectl -n default label secret s3-credentials finetune.io/credentials=true" in plain
    assert "namespaceSelector" not in plain and "rolebinding" not in plain
    secure = _render_notes(helm, tmp_path / "secure", {"namespaceSelector": {"finetune.io/enabled": "true"},
                                                       "rbac": {"clusterWideSecrets": False, "credentialsNamespaces": ["team-a"]}})
    assert "kubectl label namespace default finetune.io/enabled=true" in secure
    assert "It may read Secrets only in: team-a" in secure
    assert ("kubectl -n default create rolebinding ftop-finetune-operator-credentials --clusterrole=ftop-finetune-operator-credentials "
            "--serviceaccount=finetune-system:ftop-finetune-operator") in secure


def test_rbac_covers_the_raw_api_calls_too() -> None:
    """kube.secret_labels calls the API directly (a metadata-only GET), which the generated-client scan
    in test_chart.test_rbac_covers_every_api_call_of_the_operator does not see."""
    import re

    from test_chart import REPO

    source = (REPO / "operator" / "finetune_operator" / "kube.py").read_text()
    calls = re.findall(r'call_api\(\s*"/api/v1/namespaces/\{namespace\}/(\w+)/\{name\}",\s*"(\w+)"', source)
    assert calls == [("secrets", "GET")]
    assert "get" in {**CLUSTER_RULES, **NAMESPACED_RULES}[("", "secrets")]
