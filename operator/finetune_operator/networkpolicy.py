"""Pure builder of the NetworkPolicy a FineTuneJob's pods get: who may connect to a training pod.

A training pod listens on torchrun's rendezvous port (rank 0), on the ports the collective backend
(NCCL/Gloo) opens between ranks, and on one Prometheus port per local rank. Without a policy, every pod
in the cluster can reach all of them: another tenant could join the rendezvous, feed tensors into the
collectives or scrape a job's metrics. The policy admits:

- every port from the job's own pods (the collective backend picks its ports at random, so the
  ranks of one job must reach each other on any port);
- the metrics ports from the namespaces the chart names (``trainer.networkPolicy.metricsFrom``:
  a namespace label selector; empty selects every namespace, so a Prometheus anywhere keeps working).

Egress is left open: the trainer reaches the S3 endpoint the spec names, wherever that is.
A policy only has an effect under a CNI plugin that enforces NetworkPolicy (Calico, Cilium...).
"""

from __future__ import annotations

from typing import Any

from finetune_api.spec import FineTuneJobSpec
from finetune_operator.builders import LABEL_JOB, LABEL_MANAGED_BY, MANAGED_BY, Owner, labels, procs_per_node
from finetune_operator.config import OperatorDefaults


def network_policy_name(owner: Owner) -> str:
    return f"{owner.name}-pods"


def _job_pods(owner: Owner) -> dict[str, Any]:
    return {"matchLabels": {LABEL_JOB: owner.name, LABEL_MANAGED_BY: MANAGED_BY}}


def build_network_policy(owner: Owner, spec: FineTuneJobSpec, defaults: OperatorDefaults) -> dict[str, Any]:
    """The job's NetworkPolicy (``networking.k8s.io/v1``), owned by the FineTuneJob like its other children."""
    ingress: list[dict[str, Any]] = [{"from": [{"podSelector": _job_pods(owner)}]}]
    base = defaults.metrics_port
    if base > 0:
        ports = [{"protocol": "TCP", "port": base + i} for i in range(procs_per_node(spec))]
        ingress.append({
            "from": [{"namespaceSelector": {"matchLabels": dict(defaults.metrics_from_namespaces)}}],
            "ports": ports,
        })
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": network_policy_name(owner),
            "namespace": owner.namespace,
            "labels": labels(owner),
            "ownerReferences": [owner.reference()],
        },
        "spec": {"podSelector": _job_pods(owner), "policyTypes": ["Ingress"], "ingress": ingress},
    }
