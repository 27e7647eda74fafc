"""What kwok simulates in the local cluster: the fake GPU nodes and how their pods live and end.

kwok keeps the nodes annotated ``kwok.x-k8s.io/node: fake`` Ready and moves their pods through the
Stages in ``data/kwok-stages.yaml`` (shipped as package data): Pending -> Running at once, then an
ending driven by the annotations below, and immediate removal when deleted. Pure builders only;
``LocalCluster`` sends what they return to the API server.
"""

from __future__ import annotations

from importlib.resources import files
from typing import Any, Mapping

FAKE_NODE_ANNOTATION = "kwok.x-k8s.io/node"  # value "fake": kwok manages the node and its pods
# Disk the local cluster's nodes (kwok's and the process node) advertise: every trainer pod requests
# resources.cacheSize + scratchSize + 1Gi of ephemeral storage (61Gi by default), and the pods' own
# limit (pods, GPUs) should decide how many fit on a node, not this.
FAKE_EPHEMERAL_STORAGE = "64Ti"
# The Stage file names these four literally (tests/unit/devcluster/test_components.py checks they agree).
EXIT_ANNOTATION = "finetune.io/kwok-exit"  # "0" -> Succeeded, other integer -> Failed with that exit code
MESSAGE_ANNOTATION = "finetune.io/kwok-message"  # containerStatuses[].state.terminated.message
REASON_ANNOTATION = "finetune.io/kwok-reason"  # terminated.reason (default Completed / Error)
DELAY_ANNOTATION = "finetune.io/kwok-exit-delay"  # Go duration before the exit is applied, e.g. "2s"


def stages() -> str:
    """The kwok Stage documents, as kwok's ``--config`` file takes them."""
    return files(__package__).joinpath("data", "kwok-stages.yaml").read_text(encoding="utf-8")


def fake_node(name: str, resources: Mapping[str, str], kubelet_version: str) -> dict[str, Any]:
    """A Node that kwok manages, advertising ``resources`` (capacity = allocatable) and labelled like a
    GPU node (``nvidia.com/gpu.present``), so jobs that select GPU nodes land on it."""
    res = dict(resources)
    res.setdefault("ephemeral-storage", FAKE_EPHEMERAL_STORAGE)
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {FAKE_NODE_ANNOTATION: "fake", "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {
                "type": "kwok",
                "nvidia.com/gpu.present": "true",
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "node-role.kubernetes.io/agent": "",
            },
        },
        "spec": {},
        "status": {
            "allocatable": res,
            "capacity": res,
            "nodeInfo": {"architecture": "amd64", "operatingSystem": "linux", "kubeletVersion": kubelet_version},
        },
    }


def exit_annotations(exit_code: int, message: str = "", reason: str | None = None, delay: str | None = None) -> dict[str, str | None]:
    """The annotations that make the exit Stage end a pod: every container terminates with ``exit_code``
    (phase Succeeded for 0, Failed otherwise). A None value removes the annotation in a merge patch."""
    if not isinstance(exit_code, int) or isinstance(exit_code, bool) or not 0 <= exit_code <= 255:
        raise ValueError(f"exit_code must be an int in 0..255, got {exit_code!r}")
    return {
        EXIT_ANNOTATION: str(exit_code),
        MESSAGE_ANNOTATION: message or None,
        REASON_ANNOTATION: reason,
        DELAY_ANNOTATION: delay,
    }
