"""The pure parts of `make demo` on the real node (stack.py): examples pointed at the node's address, the
Prometheus target files the node keeps for its pods, the Prometheus job that reads the operator's."""

from __future__ import annotations

import json

import yaml

from finetune_api.spec import FineTuneJobSpec
from finetune_devcluster import stack
from finetune_devcluster.prometheus import config


def test_an_example_points_its_s3_and_mlflow_endpoints_at_the_node_and_nothing_else_changes():
    text = (stack.EXAMPLES / "sentiment-tracked.yaml").read_text()
    moved = stack.for_node(text, "10.245.0.1")
    doc = yaml.safe_load(moved)
    assert doc["spec"]["storage"]["endpoint"] == "http://10.245.0.1:9000"
    assert doc["spec"]["tracking"]["mlflow"]["uri"] == "http://10.245.0.1:5000"
    assert "127.0.0.1" not in yaml.safe_dump(doc)  # comments aside, no loopback endpoint is left
    before = yaml.safe_load(text)
    before["spec"]["storage"]["endpoint"] = "http://10.245.0.1:9000"
    before["spec"]["tracking"]["mlflow"]["uri"] = "http://10.245.0.1:5000"
    assert doc == before


def test_every_example_fits_a_small_node_s_disk():
    """A real kubelet schedules the ephemeral-storage request (cacheSize + scratchSize + 1Gi): with the
    defaults (61Gi a pod) a 250 GB disk holds three pods; the demo runs eleven at once."""
    paths = [*stack.EXAMPLES.glob("*.yaml"), *stack.EXAMPLES.glob("*/*.yaml")]
    assert len(paths) >= 10
    for path in paths:
        for doc in yaml.safe_load_all(path.read_text()):
            res = doc["spec"]["resources"] if doc["kind"] == "FineTuneJob" else doc["spec"]["template"]["resources"]
            assert (res["cacheSize"], res["scratchSize"]) == ("2Gi", "2Gi"), path
            if doc["kind"] == "FineTuneJob":
                FineTuneJobSpec.model_validate(doc["spec"])  # still a valid spec


def _pod(name, app, ports, phase="Running", ip="10.245.0.7", ns="default", deleting=False):
    meta = {"name": name, "namespace": ns, "labels": {"app.kubernetes.io/name": app}}
    if deleting:
        meta["deletionTimestamp"] = "2026-12-06T00:00:00Z"
    return {"metadata": meta, "spec": {"containers": [{"name": "c", "ports": [{"name": n, "containerPort": p} for n, p in ports]}]},
            "status": {"phase": phase, "podIP": ip}}


def test_metrics_targets_are_each_running_pods_metrics_ports_by_kind():
    pods = [
        _pod("ftj-0-0", "finetune-trainer", [("metrics", 9400), ("metrics-1", 9401), ("rendezvous", 29500)], ip="10.245.0.9"),
        _pod("ftj-0-1", "finetune-trainer", [("metrics", 9400)], phase="Pending"),
        _pod("old-0-0", "finetune-trainer", [("metrics", 9400)], deleting=True),
        _pod("op-abc", "finetune-operator", [("metrics", 8080)], ns="finetune-system", ip="10.245.0.3"),
        _pod("coredns-x", "coredns", [("metrics", 9153)], ns="kube-system"),
    ]
    got = stack.metrics_targets(pods)
    assert got["trainer"] == [{"targets": ["10.245.0.9:9400", "10.245.0.9:9401"], "labels": {"namespace": "default", "pod": "ftj-0-0"}}]
    assert got["operator"] == [{"targets": ["10.245.0.3:8080"], "labels": {"namespace": "finetune-system", "pod": "op-abc"}}]


def test_targets_are_written_whole(tmp_path):
    path = tmp_path / "targets.json"
    stack.write_targets(path, [{"targets": ["a:1"], "labels": {}}])
    stack.write_targets(path, [])
    assert json.loads(path.read_text()) == [] and not path.with_suffix(".tmp").exists()


def test_prometheus_reads_the_operator_from_a_file_on_a_real_node_and_from_a_static_target_otherwise():
    on_node = config("/s/targets.json", [], operator_targets_file="/s/operator-targets.json")
    (op, trainer) = on_node["scrape_configs"]
    assert op == {"job_name": "finetune-operator", "file_sd_configs": [{"files": ["/s/operator-targets.json"], "refresh_interval": "1s"}]}
    assert trainer["honor_labels"] is True and trainer["file_sd_configs"][0]["files"] == ["/s/targets.json"]
    local = config(None, ["127.0.0.1:8080"])
    assert local["scrape_configs"] == [{"job_name": "finetune-operator", "static_configs": [{"targets": ["127.0.0.1:8080"]}]}]


def test_the_summary_tells_where_the_operator_and_the_pods_are_on_each_kind_of_node(tmp_path):
    class S3:
        endpoint_url, access_key, host = "http://10.245.0.1:9000", "k", "10.245.0.1"

    (tmp_path / "mlflow.port").write_text("5000\n")
    real = stack.summary({}, S3(), tmp_path, node="real")
    assert "kubectl logs -n finetune-system deploy/finetune-operator" in real and "kubectl get pods -A -o wide" in real
    assert "mlflow:      http://10.245.0.1:5000" in real
    process = stack.summary({}, S3(), tmp_path)
    assert "operator:    http://127.0.0.1:8080/metrics" in process and "mlflow:      http://127.0.0.1:5000" in process


def test_a_rebuilt_image_replaces_the_older_builds_of_its_repository_only():
    from finetune_devcluster.realnode import older_builds

    refs = ["localhost/finetune-trainer:aaa", "localhost/finetune-trainer:bbb", "localhost/finetune-operator:aaa",
            "localhost/finetune-pause:v1", "sha256:0123", "localhost/finetune-trainer@sha256:0123"]
    assert older_builds(refs, "localhost/finetune-trainer:bbb") == ["localhost/finetune-trainer:aaa"]
    assert older_builds(refs, "localhost/finetune-pause:v1") == []
