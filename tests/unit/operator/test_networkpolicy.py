"""The per-job NetworkPolicy: it selects exactly the job's pods, lets the job's own pods in on any port
and the metrics ports in from the configured namespaces only."""

from finetune_api.spec import parse_spec
from finetune_operator import builders
from finetune_operator.config import OperatorDefaults
from finetune_operator.networkpolicy import build_network_policy, network_policy_name

OWNER = builders.Owner(name="llama-ft", namespace="team-a", uid="u-1")
SPEC = parse_spec({
    "model": {"uri": "s3://models/llama"},
    "dataset": {"train": "s3://data/train.jsonl"},
    "output": {"uri": "s3://out/llama-ft"},
    "resources": {"nodes": 2, "gpusPerNode": 4},
})


def _selects(selector: dict, pod_labels: dict) -> bool:
    return all(pod_labels.get(k) == v for k, v in selector["matchLabels"].items())


def test_policy_selects_the_jobs_pods_and_no_other_jobs():
    policy = build_network_policy(OWNER, SPEC, OperatorDefaults())
    assert policy["metadata"]["name"] == network_policy_name(OWNER) == "llama-ft-pods"
    assert policy["metadata"]["ownerReferences"] == [OWNER.reference()]
    pod_labels = builders.build_job(OWNER, SPEC, 3, OperatorDefaults())["spec"]["template"]["metadata"]["labels"]
    assert _selects(policy["spec"]["podSelector"], pod_labels), "the policy must select the job's pods"
    other = builders.Owner(name="other", namespace="team-a", uid="u-2")
    other_labels = builders.build_job(other, SPEC, 0, OperatorDefaults())["spec"]["template"]["metadata"]["labels"]
    assert not _selects(policy["spec"]["podSelector"], other_labels)
    assert policy["spec"]["policyTypes"] == ["Ingress"], "egress stays open: the S3 endpoint can be anywhere"


def test_own_pods_reach_every_port_and_the_metrics_ports_are_open_to_the_selected_namespaces():
    defaults = OperatorDefaults(metrics_from_namespaces=(("kubernetes.io/metadata.name", "monitoring"),))
    own, metrics = build_network_policy(OWNER, SPEC, defaults)["spec"]["ingress"]
    assert own == {"from": [{"podSelector": {"matchLabels": {builders.LABEL_JOB: "llama-ft", builders.LABEL_MANAGED_BY: "finetune-operator"}}}]}
    assert "ports" not in own, "the collective backend picks its ports at random"
    assert metrics["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    container = builders.build_job(OWNER, SPEC, 0, defaults)["spec"]["template"]["spec"]["containers"][0]
    declared = sorted(p["containerPort"] for p in container["ports"] if p["name"].startswith(builders.METRICS_PORT_NAME))
    assert sorted(p["port"] for p in metrics["ports"]) == declared == [9400, 9401, 9402, 9403]
    assert builders.MASTER_PORT not in {p["port"] for p in metrics["ports"]}, "the rendezvous port is for the job's own pods"


def test_every_namespace_may_scrape_by_default_and_no_metrics_rule_without_metrics():
    _, metrics = build_network_policy(OWNER, SPEC, OperatorDefaults())["spec"]["ingress"]
    assert metrics["from"] == [{"namespaceSelector": {"matchLabels": {}}}]
    assert len(build_network_policy(OWNER, SPEC, OperatorDefaults(metrics_port=0))["spec"]["ingress"]) == 1
