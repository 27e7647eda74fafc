"""The control plane's argv builders, config files and kwok data, checked without starting anything.

``test_control_plane_argv_is_exactly_what_the_cluster_ran`` pins every flag: it is the argv the cluster
was started with before the builders existed, so a changed flag is a deliberate, visible edit here.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
import yaml

from finetune_devcluster import components, kwok
from finetune_devcluster.pki import PKI, CertPair

BINS = {name: Path(f"/opt/bin/{name}") for name in components.COMPONENTS}
PORTS = {"etcd": 2379, "etcd-peer": 2380, "apiserver": 6443}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return PKI(tmp_path_factory.mktemp("w") / "pki", service_ip=components.SERVICE_IP)


def test_control_plane_argv_is_exactly_what_the_cluster_ran(pki: PKI) -> None:
    w = pki.dir.parent
    argv = components.control_plane_argv(BINS, w, PORTS, pki)
    assert tuple(argv) == components.COMPONENTS  # start order
    assert argv == {
        "etcd": [
            "/opt/bin/etcd", "--name=default", f"--data-dir={w / 'etcd'}",
            "--listen-client-urls=http://127.0.0.1:2379", "--advertise-client-urls=http://127.0.0.1:2379",
            "--listen-peer-urls=http://127.0.0.1:2380", "--initial-advertise-peer-urls=http://127.0.0.1:2380",
            "--initial-cluster=default=http://127.0.0.1:2380", "--unsafe-no-fsync=true",
            "--quota-backend-bytes=2147483648", "--log-level=warn",
        ],
        "kube-apiserver": [
            "/opt/bin/kube-apiserver", "--etcd-servers=http://127.0.0.1:2379", "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1", "--secure-port=6443", f"--cert-dir={w / 'apiserver'}",
            f"--tls-cert-file={w / 'pki/apiserver.crt'}", f"--tls-private-key-file={w / 'pki/apiserver.key'}",
            f"--client-ca-file={w / 'pki/ca.crt'}", f"--service-account-key-file={w / 'pki/sa.pub'}",
            f"--service-account-signing-key-file={w / 'pki/sa.key'}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            "--service-cluster-ip-range=10.96.0.0/12", "--authorization-mode=Node,RBAC",
            "--enable-admission-plugins=NodeRestriction", "--allow-privileged=true",
            "--endpoint-reconciler-type=none", "--profiling=false",
            f"--kubelet-client-certificate={w / 'pki/apiserver-kubelet-client.crt'}",
            f"--kubelet-client-key={w / 'pki/apiserver-kubelet-client.key'}",
            "--kubelet-preferred-address-types=InternalIP,Hostname", "--v=1",
        ],
        "kube-controller-manager": [
            "/opt/bin/kube-controller-manager", f"--kubeconfig={w / 'controller-manager.kubeconfig'}",
            "--leader-elect=false", "--secure-port=0", "--controllers=*", "--use-service-account-credentials=true",
            f"--service-account-private-key-file={w / 'pki/sa.key'}", f"--root-ca-file={w / 'pki/ca.crt'}",
            f"--cluster-signing-cert-file={w / 'pki/ca.crt'}", f"--cluster-signing-key-file={w / 'pki/ca.key'}",
            "--service-cluster-ip-range=10.96.0.0/12", "--kube-api-qps=100", "--kube-api-burst=200", "--v=1",
        ],
        "kube-scheduler": ["/opt/bin/kube-scheduler", f"--config={w / 'scheduler.yaml'}", "--secure-port=0", "--v=1"],
        "kwok": [
            "/opt/bin/kwok", f"--kubeconfig={w / 'kwok.kubeconfig'}", f"--config={w / 'kwok.yaml'}",
            "--manage-all-nodes=false", "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
            "--cidr=10.244.0.1/16", "--node-ip=10.240.0.1", "--node-lease-duration-seconds=40",
        ],
    }


def test_each_builder_takes_its_ports_and_paths(tmp_path: Path) -> None:
    etcd = components.etcd_argv(Path("etcd"), data_dir=tmp_path / "data", client_port=1111, peer_port=2222)
    assert f"--data-dir={tmp_path / 'data'}" in etcd
    assert "--listen-client-urls=http://127.0.0.1:1111" in etcd
    assert "--initial-cluster=default=http://127.0.0.1:2222" in etcd

    serving = CertPair(tmp_path / "s.crt", tmp_path / "s.key")
    api = components.kube_apiserver_argv(
        Path("kube-apiserver"), etcd_port=1111, secure_port=3333, cert_dir=tmp_path / "c", serving=serving,
        client_ca=tmp_path / "ca.crt", sa_pub=tmp_path / "sa.pub", sa_key=tmp_path / "sa.key",
    )
    assert api[0] == "kube-apiserver"
    assert {"--etcd-servers=http://127.0.0.1:1111", "--secure-port=3333", "--authorization-mode=Node,RBAC",
            f"--tls-cert-file={serving.cert}", f"--client-ca-file={tmp_path / 'ca.crt'}"} <= set(api)

    ca = CertPair(tmp_path / "ca.crt", tmp_path / "ca.key")
    kcm = components.kube_controller_manager_argv(Path("kcm"), kubeconfig=tmp_path / "k", ca=ca, sa_key=tmp_path / "sa.key")
    assert {f"--kubeconfig={tmp_path / 'k'}", f"--cluster-signing-key-file={ca.key}", "--use-service-account-credentials=true"} <= set(kcm)

    assert components.kube_scheduler_argv(Path("s"), config=tmp_path / "s.yaml") == ["s", f"--config={tmp_path / 's.yaml'}", "--secure-port=0", "--v=1"]
    kw = components.kwok_argv(Path("kwok"), kubeconfig=tmp_path / "k", config=tmp_path / "kwok.yaml")
    assert f"--manage-nodes-with-annotation-selector={kwok.FAKE_NODE_ANNOTATION}=fake" in kw


def test_scheduler_config_points_at_its_kubeconfig() -> None:
    cfg = components.kube_scheduler_config(Path("/w/scheduler.kubeconfig"))
    assert cfg["kind"] == "KubeSchedulerConfiguration"
    assert cfg["clientConnection"] == {"kubeconfig": "/w/scheduler.kubeconfig", "qps": 100, "burst": 200}
    assert cfg["leaderElection"] == {"leaderElect": False}


def test_kubeconfig_inlines_the_ca_and_client_certificate(pki: PKI) -> None:
    cfg = json.loads(components.kubeconfig_yaml("https://127.0.0.1:6443", pki.ca.cert, pki.kwok.cert, pki.kwok.key, "kwok"))
    (cluster,) = cfg["clusters"]
    (user,) = cfg["users"]
    assert cluster["cluster"]["server"] == "https://127.0.0.1:6443"
    assert base64.b64decode(cluster["cluster"]["certificate-authority-data"]) == pki.ca.cert.read_bytes()
    assert base64.b64decode(user["user"]["client-key-data"]) == pki.kwok.key.read_bytes()
    assert user["name"] == "kwok" and cfg["current-context"] == "finetune-devcluster"


def test_kwok_stages_are_packaged_and_name_our_annotations() -> None:
    text = kwok.stages()
    stages = {d["metadata"]["name"]: d for d in yaml.safe_load_all(text)}
    assert list(stages) == ["pod-ready", "finetune-pod-exit", "pod-delete"]
    assert all(d["kind"] == "Stage" and d["spec"]["resourceRef"]["kind"] == "Pod" for d in stages.values())
    exit_stage = text.split("\n---\n")[1]  # the raw document: its statusTemplate is Go template text
    assert "name: finetune-pod-exit" in exit_stage
    for annotation in (kwok.EXIT_ANNOTATION, kwok.MESSAGE_ANNOTATION, kwok.REASON_ANNOTATION, kwok.DELAY_ANNOTATION):
        assert f'"{annotation}"' in exit_stage, annotation
    assert stages["pod-delete"]["spec"]["next"]["delete"] is True


def test_exit_annotations_validate_the_exit_code() -> None:
    assert kwok.exit_annotations(3, "boom", reason="OOMKilled", delay="2s") == {
        kwok.EXIT_ANNOTATION: "3", kwok.MESSAGE_ANNOTATION: "boom", kwok.REASON_ANNOTATION: "OOMKilled",
        kwok.DELAY_ANNOTATION: "2s",
    }
    assert kwok.exit_annotations(0) == {kwok.EXIT_ANNOTATION: "0", kwok.MESSAGE_ANNOTATION: None,
                                        kwok.REASON_ANNOTATION: None, kwok.DELAY_ANNOTATION: None}
    for bad in (-1, 256, True, "1"):
        with pytest.raises(ValueError, match="exit_code must be an int in 0..255"):
            kwok.exit_annotations(bad)  # type: ignore[arg-type]


def test_fake_node_is_a_kwok_gpu_node() -> None:
    node = kwok.fake_node("kwok-node-0", {"cpu": "32", "nvidia.com/gpu": "8"}, "v1.33.13")
    assert node["metadata"]["annotations"][kwok.FAKE_NODE_ANNOTATION] == "fake"
    assert node["metadata"]["labels"]["nvidia.com/gpu.present"] == "true"
    assert node["metadata"]["labels"]["kubernetes.io/hostname"] == "kwok-node-0"
    assert node["status"]["capacity"] == node["status"]["allocatable"] == {
        "cpu": "32", "nvidia.com/gpu": "8", "ephemeral-storage": "64Ti",
    }
    assert node["status"]["nodeInfo"]["kubeletVersion"] == "v1.33.13"
