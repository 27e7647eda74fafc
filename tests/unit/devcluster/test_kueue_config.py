"""finetune_devcluster.kueue's pure parts: the manager's Configuration and the webhooks registered by URL."""

from __future__ import annotations

import base64
from pathlib import Path

from finetune_devcluster import kueue, tools

MANIFESTS = """\
---
apiVersion: admissionregistration.k8s.io/v1
kind: MutatingWebhookConfiguration
metadata:
  name: mutating-webhook-configuration
webhooks:
- admissionReviewVersions: [v1]
  clientConfig:
    service: {name: webhook-service, namespace: system, path: /mutate-batch-v1-job}
  failurePolicy: Fail
  name: mjob.kb.io
  rules:
  - {apiGroups: [batch], apiVersions: [v1], operations: [CREATE], resources: [jobs]}
  sideEffects: None
- admissionReviewVersions: [v1]
  clientConfig:
    service: {name: webhook-service, namespace: system, path: /mutate--v1-pod}
  failurePolicy: Fail
  name: mpod.kb.io
  rules:
  - {apiGroups: [""], apiVersions: [v1], operations: [CREATE], resources: [pods]}
  sideEffects: None
---
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingWebhookConfiguration
metadata:
  name: validating-webhook-configuration
webhooks:
- admissionReviewVersions: [v1]
  clientConfig:
    service: {name: webhook-service, namespace: system, path: /validate-kueue-x-k8s-io-v1beta2-clusterqueue}
  failurePolicy: Fail
  name: vclusterqueue.kb.io
  rules:
  - {apiGroups: [kueue.x-k8s.io], apiVersions: [v1beta2], operations: [CREATE, UPDATE], resources: [clusterqueues]}
  sideEffects: None
"""


def test_configuration_manages_only_queued_batch_jobs_on_loopback(tmp_path: Path):
    cfg = kueue.configuration(health_port=1, metrics_port=2, webhook_port=3, cert_dir=tmp_path)
    assert cfg["apiVersion"] == "config.kueue.x-k8s.io/v1beta2" and cfg["kind"] == "Configuration"
    assert cfg["integrations"] == {"frameworks": ["batch/job"]}
    assert cfg["manageJobsWithoutQueueName"] is False
    assert cfg["internalCertManagement"] == {"enable": False}
    assert cfg["webhook"] == {"host": "127.0.0.1", "port": 3, "certDir": str(tmp_path)}
    assert cfg["health"]["healthProbeBindAddress"] == "127.0.0.1:1" and cfg["metrics"]["bindAddress"] == "127.0.0.1:2"
    assert cfg["leaderElection"] == {"leaderElect": False}
    assert cfg["featureGates"] == {"VisibilityOnDemand": False}


def test_webhooks_point_at_loopback_with_the_ca_and_skip_unserved_groups():
    out = kueue.webhook_configurations(MANIFESTS, port=9443, ca_pem=b"PEM")
    assert [(c["kind"], c["metadata"]) for c in out] == [
        ("MutatingWebhookConfiguration", {"name": "kueue-mutating-webhook-configuration"}),
        ("ValidatingWebhookConfiguration", {"name": "kueue-validating-webhook-configuration"}),
    ]
    (job,), (cq,) = out[0]["webhooks"], out[1]["webhooks"]  # the pod webhook is gone
    assert job["name"] == "mjob.kb.io" and job["failurePolicy"] == "Fail" and job["rules"][0]["resources"] == ["jobs"]
    assert job["clientConfig"] == {"url": "https://127.0.0.1:9443/mutate-batch-v1-job", "caBundle": base64.b64encode(b"PEM").decode()}
    assert cq["clientConfig"]["url"] == "https://127.0.0.1:9443/validate-kueue-x-k8s-io-v1beta2-clusterqueue"


def test_argv_and_the_pinned_bundle():
    assert kueue.argv(Path("/bin/kueue"), Path("/w/config.yaml"))[:2] == ["/bin/kueue", "--config=/w/config.yaml"]
    b = tools.BUNDLES["kueue"]
    assert b.key == f"kueue-{tools.KUEUE_VERSION}" and b.tools == ("kueue",)
    assert [(m, v, dst) for m, v, _src, dst in b.module_files] == [
        ("sigs.k8s.io/kueue", tools.KUEUE_VERSION, "crds"), ("sigs.k8s.io/kueue", tools.KUEUE_VERSION, "webhook")]
    ((cmd, cwd),) = b.commands(Path("/out"))
    assert cwd is None and cmd[-1] == f"sigs.k8s.io/kueue/cmd/kueue@{tools.KUEUE_VERSION}"
    assert f"-X sigs.k8s.io/kueue/pkg/version.GitVersion={tools.KUEUE_VERSION}" in next(a for a in cmd if a.startswith("-ldflags="))
