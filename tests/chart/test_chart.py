"""Tests of the Helm chart in charts/finetune-operator, run through the real ``helm`` binary.

They lint the chart, render it with ``helm template`` and assert on the parsed objects (security
context, RBAC verbs, monitor toggles, per-namespace Roles), check that values.schema.json rejects bad
values, that the chart ships exactly the generated CRD from crds/, and that the example in NOTES.txt
is a valid FineTuneJob.

helm is found through the HELM environment variable, then the project's pinned build
($FINETUNE_BIN_DIR/helm or ~/.cache/finetune-operator/bin/helm-<version>/helm, filled by `make tools`),
then PATH. Without it these tests FAIL (not skip): a chart nobody rendered is not a tested chart.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_api import spec as api
from finetune_devcluster import tools

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "finetune-operator"
CRD_SOURCE = REPO / "crds" / "finetune.io_finetunejobs.yaml"
CHART_CRD = CHART / "crds" / "finetune.io_finetunejobs.yaml"
SWEEP_CRD_SOURCE = REPO / "crds" / "finetune.io_finetunesweeps.yaml"
SWEEP_CHART_CRD = CHART / "crds" / "finetune.io_finetunesweeps.yaml"

RELEASE = "ftop"
NAMESPACE = "finetune-system"
# Render against the project's control-plane version instead of whatever default the helm binary
# was built with (a `go install` build defaults to v1.20, below the chart's kubeVersion).
KUBE_VERSION = "1.33.0"

# The operator's RBAC, exactly: (apiGroup, resource) -> verbs. Keep in step with the calls in
# operator/finetune_operator/kube.py and Kopf's needs (watches, events, finalizer patches).
NAMESPACED_RULES: dict[tuple[str, str], set[str]] = {
    # delete: kube.delete_finetunejob (ttlSecondsAfterFinished); create/patch: a sweep's trials (sweep_handlers)
    ("finetune.io", "finetunejobs"): {"get", "list", "watch", "create", "patch", "delete"},
    ("finetune.io", "finetunejobs/status"): {"get", "patch"},
    ("finetune.io", "finetunesweeps"): {"get", "list", "watch", "patch"},
    ("finetune.io", "finetunesweeps/status"): {"get", "patch"},
    # patch: kube.set_job_suspend
    ("batch", "jobs"): {"get", "list", "watch", "create", "patch", "delete"},
    ("", "services"): {"get", "list", "watch", "create", "delete"},
    ("", "configmaps"): {"get", "list", "watch", "create", "delete"},
    ("", "pods"): {"get", "list", "watch"},
    ("", "secrets"): {"get"},
    # kube.create_owned(build_network_policy(...)) and its ownership check; the garbage collector deletes it
    ("networking.k8s.io", "networkpolicies"): {"get", "create"},
    ("", "events"): {"create", "patch"},
    ("events.k8s.io", "events"): {"create", "patch"},
}
CLUSTER_RULES: dict[tuple[str, str], set[str]] = {
    ("apiextensions.k8s.io", "customresourcedefinitions"): {"get", "list", "watch"},
    ("", "namespaces"): {"get", "list", "watch"},
}

TRAINER_POD_LABEL = {"app.kubernetes.io/managed-by": "finetune-operator"}

_HELM_ENV: dict[str, str] = dict(os.environ)


# ------------------------------------------------------------------------------------------ helpers


def _find_helm() -> str | None:
    """HELM, else the project's pinned build (finetune_devcluster.tools.find: $FINETUNE_BIN_DIR, or the
    cache that `make tools` fills), else PATH. Never builds: a missing helm fails the tests."""
    if os.environ.get("HELM"):
        return os.environ["HELM"]
    pinned = tools.find("helm")
    return str(pinned) if pinned else shutil.which("helm")


@pytest.fixture(scope="session")
def helm(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = _find_helm()
    if not path or not os.access(path, os.X_OK):
        pytest.fail(
            f"helm binary not found. Run `make tools` (builds helm {tools.HELM_VERSION} into "
            f"{tools.bundle_dir('helm')}), or set HELM=/path/to/helm. Looked at HELM, "
            "$FINETUNE_BIN_DIR/helm, that cache folder and PATH."
        )
    # Keep helm's cache/config/data out of the user's home (for the helm calls of this module only).
    home = tmp_path_factory.mktemp("helm-home")
    for var in ("HELM_CACHE_HOME", "HELM_CONFIG_HOME", "HELM_DATA_HOME"):
        _HELM_ENV[var] = str(home / var.lower())
    version = subprocess.run([path, "version", "--short"], capture_output=True, text=True, check=True, env=_HELM_ENV).stdout
    assert version.startswith("v3."), f"{path} is not Helm 3: {version!r}"
    return path


def run_helm(helm: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm, *args], capture_output=True, text=True, timeout=120, env=_HELM_ENV)


def render_raw(helm: str, values: dict[str, Any] | None = None, *extra: str, chart: Path = CHART) -> subprocess.CompletedProcess[str]:
    args = ["template", RELEASE, str(chart), "--namespace", NAMESPACE, "--kube-version", KUBE_VERSION]
    if values is not None:
        args += ["--values", "-"]
    return subprocess.run(
        [helm, *args, *extra],
        input=yaml.safe_dump(values) if values is not None else None,
        capture_output=True,
        text=True,
        timeout=120,
        env=_HELM_ENV,
    )


def render(helm: str, values: dict[str, Any] | None = None, *extra: str) -> list[dict[str, Any]]:
    proc = render_raw(helm, values, *extra)
    assert proc.returncode == 0, f"helm template failed:\n{proc.stderr}"
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = of_kind(docs, kind)
    assert len(found) == 1, f"expected exactly one {kind}, got {len(found)}"
    return found[0]


def rule_map(rules: list[dict[str, Any]]) -> dict[tuple[str, str], set[str]]:
    """Flatten RBAC rules to (apiGroup, resource) -> verbs, failing on a pair granted twice."""
    out: dict[tuple[str, str], set[str]] = {}
    for rule in rules:
        assert set(rule) <= {"apiGroups", "resources", "verbs"}, f"unexpected rule fields: {rule}"
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                assert (group, resource) not in out, f"{group}/{resource} granted twice"
                out[(group, resource)] = set(rule["verbs"])
    return out


def chart_yaml() -> dict[str, Any]:
    return yaml.safe_load((CHART / "Chart.yaml").read_text())


def default_values() -> dict[str, Any]:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert len(pod["containers"]) == 1
    return pod["containers"][0]


def env_of(docs: list[dict[str, Any]]) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container(docs)["env"]}


# ---------------------------------------------------------------------------------------------- lint


@pytest.mark.parametrize(
    "values",
    [
        None,
        {"watchNamespaces": ["team-a", "team-b"], "metrics": {"serviceMonitor": {"enabled": True}, "podMonitor": {"enabled": True}}},
    ],
    ids=["defaults", "namespaced-with-monitors"],
)
def test_lint_strict(helm: str, values: dict[str, Any] | None, tmp_path: Path) -> None:
    args = ["lint", "--strict", str(CHART), "--namespace", NAMESPACE, "--kube-version", KUBE_VERSION]
    if values is not None:
        values_file = tmp_path / "values.yaml"
        values_file.write_text(yaml.safe_dump(values))
        args += ["--values", str(values_file)]
    proc = run_helm(helm, *args)
    assert proc.returncode == 0, f"helm lint --strict failed:\n{proc.stdout}\n{proc.stderr}"
    assert "0 chart(s) failed" in proc.stdout


# ------------------------------------------------------------------------------------ default render


def test_defaults_render_the_expected_objects(helm: str) -> None:
    docs = render(helm)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["ClusterRole", "ClusterRoleBinding", "Deployment", "Service", "ServiceAccount"]
    for doc in docs:
        labels = doc["metadata"]["labels"]
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/name"] == "finetune-operator"
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["helm.sh/chart"] == f"finetune-operator-{chart_yaml()['version']}"
        if doc["kind"] not in ("ClusterRole", "ClusterRoleBinding"):
            assert doc["metadata"]["namespace"] == NAMESPACE


def test_chart_metadata() -> None:
    meta = chart_yaml()
    assert meta["apiVersion"] == "v2"
    assert meta["name"] == "finetune-operator"
    assert str(meta["appVersion"]) == "0.1.0"
    assert meta["type"] == "application"


def test_deployment_is_a_single_recreated_replica(helm: str) -> None:
    deployment = one(render(helm), "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    selector = deployment["spec"]["selector"]["matchLabels"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= pod_labels.items()


def test_deployment_security_context(helm: str) -> None:
    docs = render(helm)
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}

    sc = container(docs)["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["runAsUser"] == 10001
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert "privileged" not in sc or sc["privileged"] is False

    # /tmp is the only writable path: an emptyDir.
    mounts = {m["mountPath"]: m["name"] for m in container(docs)["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]


def test_deployment_container(helm: str) -> None:
    docs = render(helm)
    app_version = str(chart_yaml()["appVersion"])
    c = container(docs)
    values = default_values()
    assert c["image"] == f"{values['image']['repository']}:{app_version}"
    assert c["imagePullPolicy"] == "IfNotPresent"
    assert c.get("command") is None and c.get("args") is None, "the image's ENTRYPOINT (finetune-operator) runs"

    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"metrics": 8080}
    for probe in ("livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz", "port": "metrics"}, probe

    assert set(c["resources"]) == {"requests", "limits"}
    assert {"cpu", "memory"} <= set(c["resources"]["requests"])
    assert {"cpu", "memory"} <= set(c["resources"]["limits"])

    env = env_of(docs)
    assert env == {
        "FINETUNE_TRAINER_IMAGE": f"{values['trainer']['image']['repository']}:{app_version}",
        "FINETUNE_TRAINER_PULL_POLICY": "IfNotPresent",
        "FINETUNE_TERMINATION_GRACE_SECONDS": "300",
        "FINETUNE_POD_START_TIMEOUT_SECONDS": "600",
        "FINETUNE_RESTART_BACKOFF_SECONDS": "20",
        "FINETUNE_RESTART_BACKOFF_MAX_SECONDS": "600",
        "FINETUNE_NETWORK_POLICY": "true",
        "FINETUNE_RESYNC_SECONDS": "10",
        "FINETUNE_METRICS_PORT": "8080",
        "FINETUNE_LOG_LEVEL": "INFO",
        "FINETUNE_PROGRESS_DEADLINE_SECONDS": "5",
        "FINETUNE_PROGRESS_MAX_BYTES": "1048576",
    }, "all namespaces and any endpoint by default: FINETUNE_NAMESPACES and FINETUNE_ALLOWED_ENDPOINTS must be absent"


def test_deployment_values_flow_through(helm: str) -> None:
    digest = "sha256:" + "ab" * 32
    docs = render(
        helm,
        {
            "image": {"tag": "1.2.3", "pullPolicy": "Always"},
            "trainer": {"image": {"repository": "registry.example/trainer", "digest": digest, "pullPolicy": "Always"}, "terminationGracePeriodSeconds": 600},
            "logLevel": "DEBUG",
            "resyncSeconds": 30,
            "metrics": {"port": 9100},
            "extraEnv": [{"name": "EXTRA", "value": "1"}],
            "nodeSelector": {"pool": "system"},
            "tolerations": [{"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"}],
            "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": [{"key": "a", "operator": "Exists"}]}]}}},
            "priorityClassName": "system-cluster-critical",
            "podLabels": {"team": "ml"},
        },
    )
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    c = container(docs)
    assert c["image"].endswith(":1.2.3")
    assert c["imagePullPolicy"] == "Always"
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"metrics": 9100}
    env = env_of(docs)
    assert env["FINETUNE_TRAINER_IMAGE"] == f"registry.example/trainer@{digest}"
    assert env["FINETUNE_METRICS_PORT"] == "9100"
    assert env["FINETUNE_LOG_LEVEL"] == "DEBUG"
    assert env["FINETUNE_TRAINER_PULL_POLICY"] == "Always"
    assert env["FINETUNE_TERMINATION_GRACE_SECONDS"] == "600"
    assert env["FINETUNE_RESYNC_SECONDS"] == "30"
    assert env["EXTRA"] == "1"
    assert pod["nodeSelector"] == {"pool": "system"}
    assert pod["tolerations"][0]["key"] == "dedicated"
    assert "nodeAffinity" in pod["affinity"]
    assert pod["priorityClassName"] == "system-cluster-critical"
    assert one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]["team"] == "ml"
    service = one(docs, "Service")
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"


def test_timing_values_reach_the_operator(helm: str) -> None:
    from finetune_operator.config import OperatorConfig

    env = env_of(render(helm, {"trainer": {"podStartTimeoutSeconds": 90, "restartBackoff": {"seconds": 5, "maxSeconds": 40}}}))
    timing = OperatorConfig.from_env(env).timing
    assert (timing.pod_start_timeout, timing.restart_backoff, timing.restart_backoff_max) == (90, 5, 40)
    proc = render_raw(helm, {"trainer": {"podStartTimeoutSeconds": 0}})
    assert proc.returncode != 0 and "schema" in proc.stderr, proc.stderr


def test_network_policy_values_reach_the_operator(helm: str) -> None:
    env = env_of(render(helm, {"trainer": {"networkPolicy": {"enabled": False, "metricsFrom": {"team": "obs", "kubernetes.io/metadata.name": "monitoring"}}}}))
    assert env["FINETUNE_NETWORK_POLICY"] == "false"
    # sorted by key, the format finetune_operator.config reads
    assert env["FINETUNE_METRICS_FROM_NAMESPACES"] == "kubernetes.io/metadata.name=monitoring,team=obs"
    proc = render_raw(helm, {"trainer": {"networkPolicy": {"metricsFrom": {"bad key!": "x"}}}})
    assert proc.returncode != 0 and "schema" in proc.stderr, proc.stderr


def test_metrics_service_selects_the_operator_pod(helm: str) -> None:
    docs = render(helm)
    service = one(docs, "Service")
    pod_labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 8080, "targetPort": "metrics", "protocol": "TCP"}]


# ---------------------------------------------------------------------------------------------- RBAC


def test_clusterrole_has_exactly_the_operator_rules(helm: str) -> None:
    docs = render(helm)
    assert not of_kind(docs, "Role") and not of_kind(docs, "RoleBinding")
    cluster_role = one(docs, "ClusterRole")
    assert rule_map(cluster_role["rules"]) == {**CLUSTER_RULES, **NAMESPACED_RULES}

    binding = one(docs, "ClusterRoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": cluster_role["metadata"]["name"]}
    service_account = one(docs, "ServiceAccount")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": service_account["metadata"]["name"], "namespace": NAMESPACE}]
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == service_account["metadata"]["name"]
    assert pod.get("automountServiceAccountToken", True) is True, "the operator talks to the API server"


_API_GROUPS = {"_core": "", "_batch": "batch", "_networking": "networking.k8s.io", "_custom": api.API_GROUP}
_VERBS = {"read": "get", "get": "get", "list": "list", "create": "create", "patch": "patch", "replace": "update", "delete": "delete"}
_RESOURCES = {
    "service": "services",
    "config_map": "configmaps",
    "job": "jobs",
    "network_policy": "networkpolicies",
    "pod": "pods",
    "pod_log": "pods/log",
    "secret": "secrets",
    "event": "events",
    "custom_object": api.PLURAL,
    "custom_object_status": f"{api.PLURAL}/status",
}


def test_rbac_covers_every_api_call_of_the_operator() -> None:
    """Every direct API call in operator/finetune_operator (through the kube.py wrappers' `_core()`,
    `_batch()`, `_custom()` clients) must be granted, or it fails with 403 only in a real cluster."""
    source = "\n".join(p.read_text() for p in sorted((REPO / "operator" / "finetune_operator").glob("*.py")))
    # Called or referenced (kube.create_owned and read_meta pick their methods from dicts).
    calls = set(re.findall(r"\b(_core|_batch|_networking|_custom)\(\)\.(\w+)\b", source))
    assert calls, "found no API calls to check; has kube.py changed shape?"
    granted = {**CLUSTER_RULES, **NAMESPACED_RULES}
    for client_fn, method in sorted(calls):
        match = re.fullmatch(r"(read|get|list|create|patch|replace|delete)_namespaced_(\w+)", method)
        assert match and match.group(2) in _RESOURCES, f"map {client_fn}().{method} to an RBAC rule in this test and the chart"
        key = (_API_GROUPS[client_fn], _RESOURCES[match.group(2)])
        verb = _VERBS[match.group(1)]
        assert verb in granted.get(key, set()), f"{client_fn}().{method} needs {verb} on {key}, which the chart does not grant"


@pytest.mark.parametrize("values", [None, {"watchNamespaces": ["team-a", "team-b"]}], ids=["cluster", "namespaced"])
def test_no_wildcards_anywhere(helm: str, values: dict[str, Any] | None) -> None:
    docs = render(helm, values)
    for doc in docs:
        for rule in doc.get("rules", []):
            for field in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[field], f"{doc['kind']} {doc['metadata']['name']}: wildcard in {field}"
                assert all("*" not in item for item in rule[field])


def test_watch_namespaces_renders_roles_per_namespace(helm: str) -> None:
    docs = render(helm, {"watchNamespaces": ["team-a", "team-b"]})
    service_account = one(docs, "ServiceAccount")["metadata"]["name"]

    cluster_role = one(docs, "ClusterRole")
    assert rule_map(cluster_role["rules"]) == CLUSTER_RULES, "only the CRD/namespace reads stay cluster-wide"

    roles = {r["metadata"]["namespace"]: r for r in of_kind(docs, "Role")}
    assert set(roles) == {"team-a", "team-b"}
    for role in roles.values():
        assert rule_map(role["rules"]) == NAMESPACED_RULES

    bindings = {b["metadata"]["namespace"]: b for b in of_kind(docs, "RoleBinding")}
    assert set(bindings) == {"team-a", "team-b"}
    for ns, binding in bindings.items():
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": roles[ns]["metadata"]["name"]}
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": service_account, "namespace": NAMESPACE}]

    assert env_of(docs)["FINETUNE_NAMESPACES"] == "team-a,team-b"


def test_existing_service_account(helm: str) -> None:
    docs = render(helm, {"serviceAccount": {"create": False, "name": "platform-sa"}})
    assert not of_kind(docs, "ServiceAccount")
    assert one(docs, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "platform-sa"
    assert one(docs, "ClusterRoleBinding")["subjects"][0]["name"] == "platform-sa"

    proc = render_raw(helm, {"serviceAccount": {"create": False}})
    assert proc.returncode != 0
    assert "serviceAccount.name is required" in proc.stderr


def test_rbac_can_be_left_to_the_cluster_admin(helm: str) -> None:
    docs = render(helm, {"rbac": {"create": False}, "watchNamespaces": ["team-a"]})
    assert not {"ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"} & {d["kind"] for d in docs}


# ------------------------------------------------------------------------------------------ monitors


def test_service_monitor_off_by_default_and_on_when_enabled(helm: str) -> None:
    assert not of_kind(render(helm), "ServiceMonitor")

    docs = render(helm, {"metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}, "interval": "15s"}}})
    monitor = one(docs, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["namespace"] == NAMESPACE
    assert monitor["metadata"]["labels"]["release"] == "prom"
    service = one(docs, "Service")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == service["spec"]["ports"][0]["name"]
    assert endpoint["path"] == "/metrics"
    assert endpoint["interval"] == "15s"


def test_pod_monitor_off_by_default_and_on_when_enabled(helm: str) -> None:
    assert not of_kind(render(helm), "PodMonitor")

    docs = render(helm, {"metrics": {"podMonitor": {"enabled": True}}})
    monitor = one(docs, "PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"] == {"matchLabels": TRAINER_POD_LABEL}
    assert monitor["spec"]["namespaceSelector"] == {"any": True}
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["path"] == "/metrics"

    # The operator's own pod must not be scraped as a trainer.
    pod_labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert not TRAINER_POD_LABEL.items() <= pod_labels.items()

    namespaced = render(helm, {"watchNamespaces": ["team-a"], "metrics": {"podMonitor": {"enabled": True}}})
    assert one(namespaced, "PodMonitor")["spec"]["namespaceSelector"] == {"matchNames": ["team-a"]}


def _scraped_port_names(endpoint: dict[str, Any], names: list[str]) -> list[str]:
    """The container port names a PodMetricsEndpoint keeps, as Prometheus evaluates it: the
    operator's own filter when `port` is set, then the relabelings' keep/drop on the port name
    (Prometheus anchors relabel regexes: fullmatch)."""
    kept = [n for n in names if "port" not in endpoint or re.fullmatch(endpoint["port"], n)]
    for rule in endpoint.get("relabelings") or []:
        if rule.get("sourceLabels") != ["__meta_kubernetes_pod_container_port_name"] or rule["action"] not in ("keep", "drop"):
            continue
        match = [n for n in kept if re.fullmatch(rule["regex"], n)]
        kept = match if rule["action"] == "keep" else [n for n in kept if n not in match]
    return kept


def test_pod_monitor_scrapes_every_local_rank(helm: str) -> None:
    """The operator declares one metrics port per local rank (metrics, metrics-1, ...); the PodMonitor
    must scrape all of them and nothing else (never torchrun's rendezvous port)."""
    from finetune_operator import builders as B

    user_rule = {"action": "replace", "targetLabel": "cluster", "replacement": "eu-1"}
    docs = render(helm, {"metrics": {"podMonitor": {"enabled": True, "relabelings": [user_rule]}}})
    (endpoint,) = one(docs, "PodMonitor")["spec"]["podMetricsEndpoints"]
    assert "port" not in endpoint and "targetPort" not in endpoint and "portNumber" not in endpoint
    assert endpoint["honorLabels"] is True  # the trainers' `job` label (FineTuneJob name) is what the dashboard groups by
    keep, endpoint_label, *user = endpoint["relabelings"]
    assert keep == {"action": "keep", "sourceLabels": ["__meta_kubernetes_pod_container_port_name"], "regex": "metrics(-[0-9]+)?"}
    assert endpoint_label == {"action": "replace", "sourceLabels": ["__meta_kubernetes_pod_container_port_name"], "targetLabel": "endpoint"}
    assert user == [user_rule]  # the user's own relabelings come after the port filter

    for procs in (1, 2, 8, B.MAX_PROCS_PER_NODE):
        declared = [{"name": "rendezvous", "containerPort": B.MASTER_PORT}, *B.metrics_container_ports(B.METRICS_PORT, procs)]
        names = [p["name"] for p in declared]
        assert _scraped_port_names(endpoint, names) == [B.metrics_port_name(i) for i in range(procs)]
    assert _scraped_port_names(endpoint, ["metrics-", "metricsx", "metrics-1-2", "xmetrics", "http-metrics"]) == []


def test_pod_monitor_port_name_and_honor_labels_are_configurable(helm: str) -> None:
    docs = render(helm, {"metrics": {"podMonitor": {"enabled": True, "port": "prom.m", "honorLabels": False}}})
    (endpoint,) = one(docs, "PodMonitor")["spec"]["podMetricsEndpoints"]
    assert endpoint["honorLabels"] is False
    assert endpoint["relabelings"][0]["regex"] == r"prom\.m(-[0-9]+)?"  # the name is quoted, not a regex
    assert _scraped_port_names(endpoint, ["prom.m", "prom.m-3", "promxm", "metrics"]) == ["prom.m", "prom.m-3"]


# -------------------------------------------------------------------------------------------- schema


@pytest.mark.parametrize(
    ("values", "extra", "message"),
    [
        (None, ["--set-string", "replicaCount=x"], "/replicaCount"),
        ({"replicaCount": 2}, [], "/replicaCount"),
        ({"replicasCount": 1}, [], "replicasCount"),
        ({"image": {"pullPolicy": "Sometimes"}}, [], "/image/pullPolicy"),
        ({"image": {"tagg": "1.0"}}, [], "tagg"),
        ({"logLevel": "verbose"}, [], "/logLevel"),
        ({"watchNamespaces": ["Team_A"]}, [], "/watchNamespaces/0"),
        ({"metrics": {"serviceMonitor": {"enabled": "yes"}}}, [], "/metrics/serviceMonitor/enabled"),
        ({"metrics": {"port": 70000}}, [], "/metrics/port"),
        ({"metrics": {"podMonitor": {"honorLabels": "yes"}}}, [], "/metrics/podMonitor/honorLabels"),
    ],
    ids=["replicaCount-string", "replicaCount-2", "unknown-top-level-key", "bad-pullPolicy", "unknown-image-key", "bad-logLevel", "bad-namespace", "enabled-not-bool", "port-out-of-range",
         "honorLabels-not-bool"],
)
def test_schema_rejects_bad_values(helm: str, values: dict[str, Any] | None, extra: list[str], message: str) -> None:
    proc = render_raw(helm, values, *extra)
    assert proc.returncode != 0, "helm template accepted an invalid value"
    assert "schema" in proc.stderr and message in proc.stderr, proc.stderr


def test_grafana_dashboard_configmap_behind_toggle(helm: str) -> None:
    assert of_kind(render(helm), "ConfigMap") == []
    cm = one(render(helm, {"grafana": {"dashboard": {"enabled": True, "namespace": "monitoring"}}}), "ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1" and cm["metadata"]["namespace"] == "monitoring"
    dashboard = json.loads(cm["data"]["finetune-operator.json"])
    titles = [p["title"] for p in dashboard["panels"]]
    for needed in ("Jobs by phase", "Progress (%)", "Train loss", "Eval loss", "Learning rate", "Tokens/s (all ranks)",
                   "Checkpoint save time", "Group restarts", "Data report (rows)", "Sweep trials by state", "Sweep best objective value"):
        assert needed in titles
    assert all(p["targets"][0]["expr"] for p in dashboard["panels"])


def test_schema_is_draft07_closed_and_matches_values() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    assert schema["additionalProperties"] is False
    assert set(schema["properties"]) == set(default_values()), "values.yaml and values.schema.json disagree on top-level keys"


def _leaf_keys(values: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and key not in {"podSecurityContext", "securityContext", "resources"}:
            keys += _leaf_keys(value, f"{path}.")
        else:
            keys.append(path)
    return keys


def test_readme_documents_every_value() -> None:
    readme = (CHART / "README.md").read_text()
    section = re.search(r"^## Values\n(.*?)(?=^## |\Z)", readme, flags=re.MULTILINE | re.DOTALL)
    assert section, "README.md has no '## Values' section"
    documented = set(re.findall(r"^\| `([^`]+)` \|", section.group(1), flags=re.MULTILINE))
    missing = [k for k in _leaf_keys(default_values()) if k not in documented]
    assert not missing, f"values missing from the README table: {missing}"
    unknown = documented - set(_leaf_keys(default_values()))
    assert not unknown, f"README documents values that do not exist: {sorted(unknown)}"


# ----------------------------------------------------------------------------------------------- CRD


@pytest.mark.parametrize("chart_crd,source", [(CHART_CRD, CRD_SOURCE), (SWEEP_CHART_CRD, SWEEP_CRD_SOURCE)], ids=["job", "sweep"])
def test_chart_crd_is_the_generated_crd(chart_crd: Path, source: Path) -> None:
    assert chart_crd.exists(), f"{chart_crd} is missing (or a dangling symlink)"
    if chart_crd.is_symlink():
        assert chart_crd.resolve() == source.resolve()
    assert chart_crd.read_bytes() == source.read_bytes(), f"{chart_crd} differs from {source}"


def test_helm_follows_the_crd_symlink(helm: str, tmp_path: Path) -> None:
    sources = [yaml.safe_load(CRD_SOURCE.read_text()), yaml.safe_load(SWEEP_CRD_SOURCE.read_text())]

    docs = render(helm, None, "--include-crds")
    crds = sorted(of_kind(docs, "CustomResourceDefinition"), key=lambda d: d["metadata"]["name"])
    assert crds == sorted(sources, key=lambda d: d["metadata"]["name"])

    proc = run_helm(helm, "package", str(CHART), "--destination", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    (package,) = tmp_path.glob("finetune-operator-*.tgz")
    with tarfile.open(package) as tar:
        for source in (CRD_SOURCE, SWEEP_CRD_SOURCE):
            member = tar.getmember(f"finetune-operator/crds/{source.name}")
            assert member.isfile(), "the package must hold the CRD itself, not a link"
            extracted = tar.extractfile(member)
            assert extracted is not None
            assert extracted.read() == source.read_bytes()


# --------------------------------------------------------------------------------------------- NOTES


def _render_notes(helm: str, tmp_path: Path, values: dict[str, Any] | None = None) -> str:
    """`helm template` never prints NOTES.txt, and `helm install --dry-run` needs a cluster; so render
    it through a copy of the chart where a ConfigMap template runs NOTES.txt through `tpl`."""
    chart = tmp_path / "finetune-operator"
    shutil.copytree(CHART, chart, symlinks=False)
    (chart / "notes-under-test.txt").write_text((CHART / "templates" / "NOTES.txt").read_text())
    (chart / "templates" / "notes-under-test.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes-under-test\n"
        'data:\n  notes: {{ tpl (.Files.Get "notes-under-test.txt") . | quote }}\n'
    )
    proc = render_raw(helm, values, "--show-only", "templates/notes-under-test.yaml", chart=chart)
    assert proc.returncode == 0, proc.stderr
    return yaml.safe_load(proc.stdout)["data"]["notes"]


def test_notes_example_is_a_valid_finetunejob(helm: str, tmp_path: Path) -> None:
    notes = _render_notes(helm, tmp_path)
    # Run the pasted command block through bash with a stand-in kubectl that keeps its stdin: this
    # checks the heredoc really ends (terminator at column 0) and yields the manifest shown.
    match = re.search(r"^(kubectl -n default apply -f - <<'YAML'\n.*?^YAML$)", notes, flags=re.DOTALL | re.MULTILINE)
    assert match, f"no pasteable apply block in NOTES.txt:\n{notes}"
    captured = tmp_path / "applied.yaml"
    script = f'kubectl() {{ cat > "$APPLIED"; }}\n{match.group(1)}\n'
    proc = subprocess.run(["bash", "-euc", script], env={**os.environ, "APPLIED": str(captured)}, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    manifest = yaml.safe_load(captured.read_text())
    assert manifest["apiVersion"] == f"{api.API_GROUP}/{api.API_VERSION}"
    assert manifest["kind"] == api.KIND
    api.parse_spec(manifest["spec"])  # raises on an invalid spec
    assert "kubectl -n default get ftj -w" in notes
    assert f"deployment/{RELEASE}-finetune-operator" in notes


def test_notes_point_at_a_watched_namespace(helm: str, tmp_path: Path) -> None:
    notes = _render_notes(helm, tmp_path, {"watchNamespaces": ["team-a", "team-b"]})
    assert "kubectl -n team-a get ftj -w" in notes
    assert "team-a, team-b" in notes


def test_the_real_node_demos_install_runs_the_images_built_here_in_the_secure_mode(helm: str) -> None:
    """What `make demo` passes to `helm upgrade --install` on the real node (stack.in_cluster_chart_args),
    rendered: one operator replica from the local image, the local trainer image as the jobs' default,
    nothing pulled, jobs may name only the demo's S3 and MLflow, credential Secrets only when labelled."""
    from finetune_api.failures import CREDENTIALS_SECRET_LABEL
    from finetune_devcluster import stack

    args = stack.in_cluster_chart_args("localhost/finetune-operator:abc123", "localhost/finetune-trainer:def456",
                                       ["http://10.245.0.1:9000", "http://10.245.0.1:5000"])
    assert args[:6] == ["upgrade", "--install", stack.RELEASE, str(stack.CHART), "-n", stack.OPERATOR_NS]
    assert args[-3:] == ["--wait", "--timeout", "180s"] and "--create-namespace" in args
    sets = [a for a in args[6:-3] if a != "--create-namespace"]
    proc = run_helm(helm, "template", stack.RELEASE, str(CHART), "--namespace", stack.OPERATOR_NS, "--kube-version", KUBE_VERSION, *sets)
    assert proc.returncode == 0, proc.stderr
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    deploy = one(docs, "Deployment")
    (container,) = deploy["spec"]["template"]["spec"]["containers"]
    assert deploy["spec"]["replicas"] == 1
    assert container["image"] == "localhost/finetune-operator:abc123" and container["imagePullPolicy"] == "Never"
    env = env_of(docs)
    assert env["FINETUNE_TRAINER_IMAGE"] == "localhost/finetune-trainer:def456"
    assert env["FINETUNE_TRAINER_PULL_POLICY"] == "Never"
    assert env["FINETUNE_RESYNC_SECONDS"] == "5" and env["FINETUNE_PROGRESS_INTERVAL"] == "5"
    assert env["FINETUNE_ALLOWED_ENDPOINTS"] == "http://10.245.0.1:9000,http://10.245.0.1:5000"
    key, value = CREDENTIALS_SECRET_LABEL
    assert env["FINETUNE_CREDENTIALS_SECRET_LABELS"] == f"{key}={value}"
