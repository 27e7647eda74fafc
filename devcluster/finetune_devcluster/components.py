"""What each control-plane component is started with: pure builders of argv lists and config files.

``LocalCluster`` (cluster.py) owns the lifecycle (ports, PKI, spawning, waiting, stopping); this module
only says *how* each binary is invoked, so the flags can be read in one place and unit-tested without
starting anything. Every builder takes the paths and ports it needs and returns plain data.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any, Mapping

from .kwok import FAKE_NODE_ANNOTATION
from .pki import PKI, CertPair

SERVICE_CIDR = "10.96.0.0/12"
SERVICE_IP = "10.96.0.1"  # the first address of SERVICE_CIDR: the `kubernetes` Service, in the serving cert
POD_CIDR = "10.244.0.1/16"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"

# Start order; stop order is the reverse, etcd last (see LocalCluster._kill_all).
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")

# File names inside the cluster's work folder that the argv lists point at.
SCHEDULER_CONFIG = "scheduler.yaml"
KWOK_CONFIG = "kwok.yaml"
ETCD_DATA = "etcd"
APISERVER_CERT_DIR = "apiserver"


def loopback(port: int) -> str:
    return f"http://127.0.0.1:{port}"


def etcd_argv(binary: Path, *, data_dir: Path, client_port: int, peer_port: int) -> list[str]:
    """A single-member etcd on loopback. No fsync and a 2 GiB quota: the data is thrown away with
    the cluster, and fsync is what makes etcd slow on CI disks."""
    client, peer = loopback(client_port), loopback(peer_port)
    return [
        str(binary),
        "--name=default",
        f"--data-dir={data_dir}",
        f"--listen-client-urls={client}",
        f"--advertise-client-urls={client}",
        f"--listen-peer-urls={peer}",
        f"--initial-advertise-peer-urls={peer}",
        f"--initial-cluster=default={peer}",
        "--unsafe-no-fsync=true",
        "--quota-backend-bytes=2147483648",
        "--log-level=warn",
    ]


def kube_apiserver_argv(
    binary: Path, *, etcd_port: int, secure_port: int, cert_dir: Path, serving: CertPair, client_ca: Path,
    sa_pub: Path, sa_key: Path, kubelet_client: CertPair | None = None, bind_address: str = "127.0.0.1",
) -> list[str]:
    """TLS with client-certificate auth, ``Node,RBAC`` authorization and NodeRestriction on top of the
    default admission plugins, as in a real cluster. ``--endpoint-reconciler-type=none``: the endpoints
    of the `kubernetes` Service would be 127.0.0.1, which Endpoints validation rejects (loopback).

    ``kubelet_client``: the certificate the API server shows a real kubelet (realnode.py) for
    ``kubectl logs/exec`` (the kubelet authorizes it with a SubjectAccessReview, as in kubeadm); kubelets
    are reached at their InternalIP (a node's Hostname does not resolve here).

    ``bind_address``: loopback by default; ``0.0.0.0`` (what kubeadm does) when pods of a real node must
    reach the API server through the `kubernetes` Service (realnode.py publishes its endpoint on the
    node's bridge address, which does not exist yet when the API server starts)."""
    kubelet = [] if kubelet_client is None else [
        f"--kubelet-client-certificate={kubelet_client.cert}",
        f"--kubelet-client-key={kubelet_client.key}",
        "--kubelet-preferred-address-types=InternalIP,Hostname",
    ]
    return [
        str(binary),
        f"--etcd-servers={loopback(etcd_port)}",
        f"--bind-address={bind_address}",
        "--advertise-address=127.0.0.1",
        f"--secure-port={secure_port}",
        f"--cert-dir={cert_dir}",
        f"--tls-cert-file={serving.cert}",
        f"--tls-private-key-file={serving.key}",
        f"--client-ca-file={client_ca}",
        f"--service-account-key-file={sa_pub}",
        f"--service-account-signing-key-file={sa_key}",
        f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
        f"--service-cluster-ip-range={SERVICE_CIDR}",
        "--authorization-mode=Node,RBAC",
        "--enable-admission-plugins=NodeRestriction",
        "--allow-privileged=true",
        "--endpoint-reconciler-type=none",
        "--profiling=false",
        *kubelet,
        "--v=1",
    ]


def kube_controller_manager_argv(binary: Path, *, kubeconfig: Path, ca: CertPair, sa_key: Path) -> list[str]:
    """Every default controller, each with its own ServiceAccount credentials (so RBAC applies to them
    as in a real cluster); the CA signs CSRs and is the root CA handed to pods."""
    return [
        str(binary),
        f"--kubeconfig={kubeconfig}",
        "--leader-elect=false",
        "--secure-port=0",
        "--controllers=*",
        "--use-service-account-credentials=true",
        f"--service-account-private-key-file={sa_key}",
        f"--root-ca-file={ca.cert}",
        f"--cluster-signing-cert-file={ca.cert}",
        f"--cluster-signing-key-file={ca.key}",
        f"--service-cluster-ip-range={SERVICE_CIDR}",
        "--kube-api-qps=100",  # defaults (20/30) throttle hundreds of Jobs (bench/operator_scale.py)
        "--kube-api-burst=200",
        "--v=1",
    ]


def kube_scheduler_argv(binary: Path, *, config: Path) -> list[str]:
    return [str(binary), f"--config={config}", "--secure-port=0", "--v=1"]


def kube_scheduler_config(kubeconfig: Path) -> dict[str, Any]:
    """The scheduler's KubeSchedulerConfiguration: its kubeconfig, no leader election, and client limits
    high enough not to throttle binding hundreds of pods (the defaults are 50/100)."""
    return {
        "apiVersion": "kubescheduler.config.k8s.io/v1",
        "kind": "KubeSchedulerConfiguration",
        "clientConnection": {"kubeconfig": str(kubeconfig), "qps": 100, "burst": 200},
        "leaderElection": {"leaderElect": False},
    }


def kwok_argv(binary: Path, *, kubeconfig: Path, config: Path) -> list[str]:
    """kwok manages only the nodes annotated ``kwok.x-k8s.io/node: fake`` (a process node next to them
    stays a real kubelet's job) and gives their pods IPs from POD_CIDR."""
    return [
        str(binary),
        f"--kubeconfig={kubeconfig}",
        f"--config={config}",
        "--manage-all-nodes=false",
        f"--manage-nodes-with-annotation-selector={FAKE_NODE_ANNOTATION}=fake",
        f"--cidr={POD_CIDR}",
        "--node-ip=10.240.0.1",
        "--node-lease-duration-seconds=40",
    ]


def kubeconfig_yaml(server: str, ca: Path, cert: Path, key: Path, user: str, context: str = "finetune-devcluster") -> str:
    """A kubeconfig with the CA and the client certificate inlined (so it stays valid if copied)."""

    def b64(p: Path) -> str:
        return base64.b64encode(p.read_bytes()).decode()

    cfg = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": context, "cluster": {"server": server, "certificate-authority-data": b64(ca)}}],
        "users": [{"name": user, "user": {"client-certificate-data": b64(cert), "client-key-data": b64(key)}}],
        "contexts": [{"name": context, "context": {"cluster": context, "user": user, "namespace": "default"}}],
        "current-context": context,
    }
    return json.dumps(cfg, indent=2)  # JSON is YAML; no yaml dependency needed


def client_kubeconfigs(workdir: Path) -> dict[str, Path]:
    """Where each client component's kubeconfig lives (one identity each: see PKI)."""
    return {who: workdir / f"{who}.kubeconfig" for who in ("controller-manager", "scheduler", "kwok")}


def control_plane_argv(bins: Mapping[str, Path], workdir: Path, ports: Mapping[str, int], pki: PKI,
                       apiserver_bind_address: str = "127.0.0.1") -> dict[str, list[str]]:
    """Component name -> argv, in start order, for a cluster whose files live in ``workdir`` and which
    listens on ``ports`` (keys ``etcd``, ``etcd-peer``, ``apiserver``, as LocalCluster records them)."""
    kubeconfigs = client_kubeconfigs(workdir)
    argv = {
        "etcd": etcd_argv(bins["etcd"], data_dir=workdir / ETCD_DATA, client_port=ports["etcd"], peer_port=ports["etcd-peer"]),
        "kube-apiserver": kube_apiserver_argv(
            bins["kube-apiserver"], etcd_port=ports["etcd"], secure_port=ports["apiserver"],
            cert_dir=workdir / APISERVER_CERT_DIR, serving=pki.apiserver, client_ca=pki.ca.cert,
            sa_pub=pki.sa_pub, sa_key=pki.sa_key, kubelet_client=pki.kubelet_client, bind_address=apiserver_bind_address,
        ),
        "kube-controller-manager": kube_controller_manager_argv(
            bins["kube-controller-manager"], kubeconfig=kubeconfigs["controller-manager"], ca=pki.ca, sa_key=pki.sa_key,
        ),
        "kube-scheduler": kube_scheduler_argv(bins["kube-scheduler"], config=workdir / SCHEDULER_CONFIG),
        "kwok": kwok_argv(bins["kwok"], kubeconfig=kubeconfigs["kwok"], config=workdir / KWOK_CONFIG),
    }
    return argv
