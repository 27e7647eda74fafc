"""A real node for the local control plane: kubelet + containerd + runc + the CNI bridge plugin.

Where the process node (procnode.py) runs a pod's command as a local process and ignores its image,
``RealNode`` runs the kubelet built from the same ``k8s.io/kubernetes`` module as the control plane,
against Debian's containerd (its CRI plugin) and runc, so a pod is what it is in a real cluster: its
image (built here, see images.py), its securityContext (non-root, read-only root filesystem, dropped
capabilities), its volumes (the ServiceAccount token included), a pod IP on a bridge, and
``kubectl logs``/``exec`` through the API server.

What this machine needs, and what the node does about it (see the README, "Real node"):

* the process lacks CAP_SYS_RESOURCE, so containerd's CRI must not lower oom_score_adj
  (``restrict_oom_score_adj``), or every sandbox fails in runc;
* no registry is reachable: the sandbox ("pause") image and the project's images are imported from
  archives with ``ctr images import`` (never pulled);
* cgroups v1 with the cgroupfs driver and no QoS cgroup hierarchy (``cgroupsPerQOS: false``,
  ``enforceNodeAllocatable: []``), swap allowed;
* the kubelet refuses a loopback node IP (and this kernel has no dummy interfaces), so the node's
  address is the gateway of its own CNI bridge: ``ftbr<i>`` with ``10.245.<i>.1/24``, created before
  the kubelet starts; the pods get the rest of ``10.245.<i>.0/24``. The API server reaches the
  kubelet there (logs, exec), pods reach the node there, the host reaches pods on the bridge. Nothing
  is routed off the machine and nothing is masqueraded;
* Services: kube-proxy (built with the kubelet, iptables mode) programs this machine's netfilter. Every
  node here shares the machine's network namespace, so one kube-proxy serves them all: node 0 runs it
  (``kube_proxy``). It leaves conntrack sysctls and ``route_localnet`` alone (node ports only on the
  node's address) and its rules are removed (``kube-proxy --cleanup``) when the node stops;
* the API server from a pod: the `kubernetes` Service (10.96.0.1:443) has no endpoints of its own here
  (``--endpoint-reconciler-type=none``: they would be loopback). When the cluster's API server listens
  beyond loopback (``LocalCluster(apiserver_bind_address="0.0.0.0")``) the node publishes one: its own
  address and the API server's port, in an EndpointSlice, so in-cluster clients (the operator from the
  chart) connect exactly as in a real cluster, with the token the kubelet mounts.

Must run as root (containerd, network interfaces). Everything else lives in ``workdir``; containerd's
image store in ``${FINETUNE_CACHE:-~/.cache/finetune-operator}/containerd`` (kept, so images are
imported once).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterable

from . import images, tools
from .components import kubeconfig_yaml
from .pki import PKI
from .procnode import NODE_LABEL
from .procutil import die_with_parent, tail

CNI_BIN_DIRS = ("/usr/lib/cni", "/opt/cni/bin")
NODE_KIND = "real"


KUBE_PROXY_HEALTHZ_PORT = 10256
KUBE_PROXY_METRICS_PORT = 10249


CLUSTER_DOMAIN = "cluster.local"
DNS_SERVICE_IP = "10.96.0.10"  # in components.SERVICE_CIDR, where kubeadm puts kube-dns
DNS_NAMESPACE = "kube-system"
DNS_NAME = "coredns"  # the Deployment, its ServiceAccount, ClusterRole (system:coredns upstream) and ConfigMap
DNS_SERVICE = "kube-dns"  # the Service's name in every distribution
DNS_HEALTH_PORT = 8080
DNS_READY_PORT = 8181
DNS_MANAGED_BY = "finetune-devcluster"


class RealNodeError(RuntimeError):
    """The node could not be started (the message carries the logs' tails)."""


def node_ip(index: int) -> str:
    """The node's address: the gateway of its pod subnet, on its bridge."""
    return f"10.245.{index}.1"


def pod_subnet(index: int) -> str:
    return f"10.245.{index}.0/24"


def containerd_config(*, root: Path, state: Path, socket: Path, cni_conf_dir: Path, cni_bin_dir: str, sandbox_image: str) -> str:
    """containerd 1.6 configuration (version 2) with only what a kubelet needs: CRI with runc, cgroupfs,
    CNI from ``cni_conf_dir``, and oom_score_adj never lowered (no CAP_SYS_RESOURCE here)."""
    cri = 'plugins."io.containerd.grpc.v1.cri"'
    return "\n".join([
        "version = 2",
        f'root = "{root}"',
        f'state = "{state}"',
        'disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",'
        ' "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]',
        "[grpc]",
        f'  address = "{socket}"',
        "[ttrpc]",
        f'  address = "{socket}.ttrpc"',
        "[debug]",
        '  address = ""',
        "[metrics]",
        '  address = ""',
        f"[{cri}]",
        f'  sandbox_image = "{sandbox_image}"',
        "  restrict_oom_score_adj = true",
        "  enable_selinux = false",
        f"[{cri}.containerd]",
        '  snapshotter = "overlayfs"',
        '  default_runtime_name = "runc"',
        f"[{cri}.containerd.runtimes.runc]",
        '  runtime_type = "io.containerd.runc.v2"',
        f"[{cri}.containerd.runtimes.runc.options]",
        "  SystemdCgroup = false",
        f"[{cri}.cni]",
        f'  bin_dir = "{cni_bin_dir}"',
        f'  conf_dir = "{cni_conf_dir}"',
        "  max_conf_num = 1",
        "",
    ])


def cni_config(name: str, bridge: str, subnet: str, ipam_dir: Path) -> dict[str, Any]:
    """A bridge with the gateway on the host, addresses from host-local; no masquerade (pods talk to
    this machine only)."""
    return {
        "cniVersion": "0.4.0",
        "name": name,
        "plugins": [
            {
                "type": "bridge",
                "bridge": bridge,
                "isGateway": True,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {"type": "host-local", "ranges": [[{"subnet": subnet}]], "routes": [{"dst": "0.0.0.0/0"}],
                         "dataDir": str(ipam_dir)},
            }
        ],
    }


def kubelet_config(*, ip: str, socket: Path, ca: Path, serving_cert: Path, serving_key: Path, pod_logs: Path,
                   cluster_dns: str | None = None) -> dict[str, Any]:
    """KubeletConfiguration: x509 + webhook authentication and webhook authorization (the API server's
    kubelet-client certificate is authorized by a SubjectAccessReview), the settings this machine
    needs (module docstring), eviction thresholds low enough that a busy shared disk does not evict.
    With ``cluster_dns`` (the kube-dns Service's address) pods of dnsPolicy ClusterFirst get it as their
    nameserver, with the cluster's search domains."""
    cfg = {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": ip,
        "port": 10250,
        "readOnlyPort": 0,
        "healthzBindAddress": ip,
        "healthzPort": 10248,
        "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": True}, "x509": {"clientCAFile": str(ca)}},
        "authorization": {"mode": "Webhook"},
        "tlsCertFile": str(serving_cert),
        "tlsPrivateKeyFile": str(serving_key),
        "containerRuntimeEndpoint": f"unix://{socket}",
        "cgroupDriver": "cgroupfs",
        "cgroupsPerQOS": False,
        "enforceNodeAllocatable": [],
        "failSwapOn": False,
        "podLogsDir": str(pod_logs),
        "clusterDomain": "cluster.local",
        "serializeImagePulls": False,
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%", "nodefs.inodesFree": "1%"},
        "nodeStatusUpdateFrequency": "5s",
        "rotateCertificates": False,
        "serverTLSBootstrap": False,
    }
    if cluster_dns:
        cfg["clusterDNS"] = [cluster_dns]
    return cfg


def kube_proxy_config(*, name: str, ip: str, kubeconfig: Path, cluster_cidr: str = "10.245.0.0/16") -> dict[str, Any]:
    """KubeProxyConfiguration: iptables mode, bound to the node's address; no conntrack sysctls
    (``maxPerCore``/timeouts 0: left as the machine has them) and no localhost node ports (so
    ``route_localnet`` is never turned on)."""
    return {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "mode": "iptables",
        "clientConnection": {"kubeconfig": str(kubeconfig)},
        "hostnameOverride": name,
        "bindAddress": ip,
        "healthzBindAddress": f"{ip}:{KUBE_PROXY_HEALTHZ_PORT}",
        "metricsBindAddress": f"{ip}:{KUBE_PROXY_METRICS_PORT}",
        "clusterCIDR": cluster_cidr,
        "nodePortAddresses": [f"{ip}/32"],
        "iptables": {"localhostNodePorts": False, "masqueradeAll": False, "syncPeriod": "30s", "minSyncPeriod": "1s"},
        "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
    }


def coredns_corefile(domain: str = CLUSTER_DOMAIN) -> str:
    """The Corefile: ``domain`` and the reverse zones from the API (kubernetes plugin, in-cluster config),
    everything else NXDOMAIN at once (nothing off this machine is reachable: no ``forward``, so a
    lookup of an outside name fails fast instead of timing out)."""
    return "\n".join([
        f"{domain}:53 in-addr.arpa:53 ip6.arpa:53 {{",
        "    errors",
        f"    health :{DNS_HEALTH_PORT} {{",
        "        lameduck 2s",
        "    }",
        f"    ready :{DNS_READY_PORT}",
        f"    kubernetes {domain} in-addr.arpa ip6.arpa {{",
        "        pods insecure",
        "        ttl 5",
        "    }",
        "    cache 30",
        "    loadbalance",
        "}",
        ".:53 {",
        "    errors",
        "    template ANY ANY {",
        "        rcode NXDOMAIN",
        "    }",
        "}",
        "",
    ])


def coredns_manifests(*, image: str, node: str, service_ip: str = DNS_SERVICE_IP, domain: str = CLUSTER_DOMAIN) -> list[dict[str, Any]]:
    """Cluster DNS as a cluster runs it: ServiceAccount, the ``system:coredns`` ClusterRole and its
    binding, the Corefile's ConfigMap, the ``kube-dns`` Service at ``service_ip`` and a one-replica
    Deployment pinned to ``node`` (tolerating every taint). The container is non-root with a read-only
    root and no capabilities; port 53 is bindable through the namespaced safe sysctl
    ``net.ipv4.ip_unprivileged_port_start`` (upstream adds NET_BIND_SERVICE to a file capability of
    its binary instead, which a FROM-scratch image built here does not carry)."""
    ns = DNS_NAMESPACE
    labels = {"k8s-app": DNS_SERVICE, "app.kubernetes.io/managed-by": DNS_MANAGED_BY}
    meta = lambda name, namespaced=True: {"name": name, **({"namespace": ns} if namespaced else {}), "labels": labels}  # noqa: E731
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta(DNS_NAME)},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": meta(f"system:{DNS_NAME}", False),
         "rules": [
             {"apiGroups": [""], "resources": ["endpoints", "services", "pods", "namespaces"], "verbs": ["list", "watch"]},
             {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]},
         ]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": meta(f"system:{DNS_NAME}", False),
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": f"system:{DNS_NAME}"},
         "subjects": [{"kind": "ServiceAccount", "name": DNS_NAME, "namespace": ns}]},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta(DNS_NAME), "data": {"Corefile": coredns_corefile(domain)}},
        {"apiVersion": "v1", "kind": "Service", "metadata": meta(DNS_SERVICE),
         "spec": {"clusterIP": service_ip, "selector": {"k8s-app": DNS_SERVICE},
                  "ports": [{"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53},
                            {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": 53}]}},
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta(DNS_NAME),
         "spec": {
             "replicas": 1,
             "selector": {"matchLabels": {"k8s-app": DNS_SERVICE}},
             "template": {
                 "metadata": {"labels": labels},
                 "spec": {
                     "serviceAccountName": DNS_NAME,
                     "priorityClassName": "system-cluster-critical",
                     "dnsPolicy": "Default",  # its own lookups (none: no forward) use the node's resolv.conf
                     "nodeSelector": {"kubernetes.io/hostname": node},
                     "tolerations": [{"operator": "Exists"}],
                     "terminationGracePeriodSeconds": 5,
                     "securityContext": {"sysctls": [{"name": "net.ipv4.ip_unprivileged_port_start", "value": "53"}]},
                     "containers": [{
                         "name": "coredns",
                         "image": image,
                         "imagePullPolicy": "Never",
                         "args": ["-conf", "/etc/coredns/Corefile"],
                         "ports": [{"name": "dns", "containerPort": 53, "protocol": "UDP"},
                                   {"name": "dns-tcp", "containerPort": 53, "protocol": "TCP"}],
                         "resources": {"requests": {"cpu": "50m", "memory": "70Mi"}, "limits": {"memory": "170Mi"}},
                         "livenessProbe": {"httpGet": {"path": "/health", "port": DNS_HEALTH_PORT}, "periodSeconds": 10,
                                           "failureThreshold": 5},
                         "readinessProbe": {"httpGet": {"path": "/ready", "port": DNS_READY_PORT}, "periodSeconds": 1},
                         "securityContext": {"runAsNonRoot": True, "readOnlyRootFilesystem": True,
                                             "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
                         "volumeMounts": [{"name": "config", "mountPath": "/etc/coredns", "readOnly": True}],
                     }],
                     "volumes": [{"name": "config", "configMap": {"name": DNS_NAME}}],
                 },
             },
         }},
    ]


_API_PATHS = {
    "ServiceAccount": "/api/v1/namespaces/{ns}/serviceaccounts",
    "ConfigMap": "/api/v1/namespaces/{ns}/configmaps",
    "Service": "/api/v1/namespaces/{ns}/services",
    "Deployment": "/apis/apps/v1/namespaces/{ns}/deployments",
    "ClusterRole": "/apis/rbac.authorization.k8s.io/v1/clusterroles",
    "ClusterRoleBinding": "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
}


def object_path(obj: dict[str, Any]) -> str:
    """The API path of one of ``coredns_manifests``' objects."""
    m = obj["metadata"]
    return _API_PATHS[obj["kind"]].format(ns=m.get("namespace", "")) + f"/{m['name']}"


def dns_query(server: str, name: str, qtype: int = 1, *, port: int = 53, timeout: float = 2.0) -> tuple[int, list[str]]:
    """One UDP DNS query (``qtype`` 1: A): ``(rcode, addresses of the A answers)``. Enough to check the
    cluster DNS from the host without a resolver library."""
    import random
    import socket
    import struct

    qid = random.randrange(1 << 16)
    q = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    q += b"".join(bytes([len(p)]) + p.encode() for p in name.rstrip(".").split(".")) + b"\0" + struct.pack(">HH", qtype, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(q, (server, port))
        while True:
            data = s.recv(4096)
            if struct.unpack(">H", data[:2])[0] == qid:
                break
    flags, qd, an = struct.unpack(">HHH", data[2:8])
    off = 12
    for _ in range(qd):  # skip the question: labels, then type and class
        while data[off]:
            off += 1 + data[off]
        off += 5
    addrs = []
    for _ in range(an):
        if data[off] & 0xC0 == 0xC0:
            off += 2
        else:
            while data[off]:
                off += 1 + data[off]
            off += 1
        rtype, _cls, _ttl, rdlen = struct.unpack(">HHIH", data[off:off + 10])
        off += 10
        if rtype == 1 and rdlen == 4:
            addrs.append(socket.inet_ntoa(data[off:off + 4]))
        off += rdlen
    return flags & 0xF, addrs


def apiserver_endpoint_slice(ip: str, port: int) -> dict[str, Any]:
    """The `kubernetes` Service's endpoint: the API server at ``ip:port`` (what the API server's own
    endpoint reconciler would write for a non-loopback advertise address)."""
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": "kubernetes",
            "namespace": "default",
            "labels": {"kubernetes.io/service-name": "kubernetes", "endpointslice.kubernetes.io/managed-by": "finetune-devcluster"},
        },
        "addressType": "IPv4",
        "endpoints": [{"addresses": [ip], "conditions": {"ready": True}}],
        "ports": [{"name": "https", "port": port, "protocol": "TCP"}],
    }


def older_builds(refs: Iterable[str], ref: str) -> list[str]:
    """The other tags of ``ref``'s repository among ``refs`` (image names, digests left out): the builds
    a content-hashed rebuild replaced."""
    repo = ref.rsplit(":", 1)[0]
    return sorted(r for r in refs if r != ref and "@" not in r and r.rsplit(":", 1)[0] == repo)


def _mounts_under(prefix: str) -> list[tuple[str, str, str]]:
    """(source, mount point, fs type) of every mount below ``prefix``."""
    with open("/proc/mounts") as f:
        fields = [line.split() for line in f]
    return [(m[0], m[1], m[2]) for m in fields if len(m) > 2 and m[1].startswith(prefix)]


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


class RealNode:
    """One kubelet + containerd joined to a ``LocalCluster``.

    Args:
        cluster: the running ``LocalCluster`` (its CA signs the node's certificates).
        index: the node's number: name ``<prefix>-<index>``, node IP ``10.245.<index>.1`` (on bridge
            ``ftbr<index>``), pod subnet ``10.245.<index>.0/24``.
        workdir: kubelet root, containerd state, CNI configuration, logs; under the cluster's folder by default.
        images: image archives (``images.BuiltImage``) to import into containerd at start.
        taint: only pods tolerating ``finetune.io/real-node`` land here (a cluster with kwok nodes too).
        kube_proxy: run kube-proxy for the machine (default: node 0 does; see the module docstring).
        dns: run the cluster DNS (CoreDNS, as a Deployment on this node behind the ``kube-dns`` Service at
            ``10.96.0.10``) and give pods that nameserver (kubelet ``clusterDNS``). Default: node 0 does
            when it runs kube-proxy and pods can reach the API server (``apiserver_bind_address``).
    """

    def __init__(self, cluster, index: int = 0, *, workdir: str | Path | None = None, prefix: str = "real-node",
                 images_to_load: Iterable[images.BuiltImage] = (), taint: bool = False, startup_timeout: float = 120.0,
                 kube_proxy: bool | None = None, dns: bool | None = None):
        self.cluster = cluster
        self.index = index
        self.name = f"{prefix}-{index}"
        self.ip = node_ip(index)
        self.subnet = pod_subnet(index)
        self.bridge = f"ftbr{index}"
        self.workdir = Path(workdir or cluster.workdir / self.name).resolve()
        self.images = list(images_to_load)
        self.taint = taint
        self.kube_proxy = index == 0 if kube_proxy is None else kube_proxy
        self.startup_timeout = startup_timeout
        api_from_pods = cluster.apiserver_bind_address in ("0.0.0.0", self.ip)
        self.dns = (index == 0 and self.kube_proxy and api_from_pods) if dns is None else dns
        if self.dns and not (self.kube_proxy and api_from_pods):
            raise RealNodeError("dns=True needs kube_proxy and an API server that pods reach "
                                "(LocalCluster(apiserver_bind_address='0.0.0.0')): CoreDNS reads Services from the API")
        self._dns_objects: list[dict[str, Any]] = []
        # containerd's socket path must stay short (unix socket limit) and its state on a tmpfs-like /run.
        self.run_dir = Path(f"/run/finetune-node-{index}")
        self.socket = self.run_dir / "containerd.sock"
        self.containerd_root = tools.cache_dir() / "containerd" / f"node-{index}"
        self.procs: dict[str, subprocess.Popen] = {}
        self.timings: dict[str, float] = {}

    # -------------------------------------------------------------------------------- paths
    @property
    def logs_dir(self) -> Path:
        return self.workdir / "logs"

    def log(self, component: str, lines: int = 60) -> str:
        return tail(self.logs_dir / f"{component}.log", lines)

    def ctr(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        proc = subprocess.run(["ctr", "--address", str(self.socket), "--namespace", "k8s.io", *args],
                              capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RealNodeError(f"ctr {' '.join(args)} failed ({proc.returncode}): {proc.stderr}{proc.stdout}")
        return proc

    # ----------------------------------------------------------------------------- lifecycle
    def __enter__(self) -> "RealNode":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self) -> "RealNode":
        if os.geteuid() != 0:
            raise RealNodeError("a real node runs containerd and creates network interfaces: it needs root")
        for exe in ("containerd", "containerd-shim-runc-v2", "runc", "ctr", "ip", *(("iptables",) if self.kube_proxy else ())):
            if not shutil.which(exe):
                raise RealNodeError(f"{exe} not found: run `make node-deps`")
        t0 = time.monotonic()
        kubelet = tools.ensure("kubelet")
        pause = images.ensure_pause_archive()
        coredns = images.ensure_coredns_archive() if self.dns else None
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.logs_dir.mkdir(exist_ok=True)
        try:
            self._network()
            self._start_containerd(pause.ref)
            t1 = time.monotonic()
            for img in [pause, *([coredns] if coredns else []), *self.images]:
                self._import(img)
            self.timings["images_import_s"] = time.monotonic() - t1
            self._start_kubelet(kubelet)
            if self.kube_proxy:
                self._start_kube_proxy(tools.ensure("kube-proxy"))
            self._wait_ready(time.monotonic() + self.startup_timeout)
            if self.kube_proxy:
                self._wait(self._kube_proxy_healthy, time.monotonic() + self.startup_timeout, "kube-proxy /healthz")
                self._publish_apiserver_endpoint()
            if coredns is not None:
                t1 = time.monotonic()
                self._start_dns(coredns.ref)
                self.timings["dns_ready_s"] = time.monotonic() - t1
        except BaseException:
            self.stop()
            raise
        self.timings["ready_s"] = time.monotonic() - t0
        return self

    def _network(self) -> None:
        """The node's bridge with the node's address (the pods' gateway) on it, up before the first pod."""
        if _ip("link", "show", self.bridge, check=False).returncode != 0:
            _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "replace", f"{self.ip}/{self.subnet.split('/')[1]}", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        cni_dir = self.workdir / "cni"
        cni_dir.mkdir(exist_ok=True)
        (cni_dir / "10-finetune.conflist").write_text(
            json.dumps(cni_config(f"finetune-{self.name}", self.bridge, self.subnet, self.workdir / "cni-ipam"), indent=2))

    def _spawn(self, name: str, argv: list[str]) -> None:
        with open(self.logs_dir / f"{name}.log", "ab") as log:
            self.procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                cwd=self.workdir, start_new_session=True, preexec_fn=die_with_parent)

    def _start_containerd(self, sandbox_image: str) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.containerd_root.mkdir(parents=True, exist_ok=True)
        cni_bin = next((d for d in CNI_BIN_DIRS if Path(d, "bridge").exists()), None)
        if cni_bin is None:
            raise RealNodeError(f"CNI bridge plugin not found in {CNI_BIN_DIRS}: run `make node-deps`")
        cfg = self.workdir / "containerd.toml"
        cfg.write_text(containerd_config(root=self.containerd_root, state=self.run_dir / "state", socket=self.socket,
                                         cni_conf_dir=self.workdir / "cni", cni_bin_dir=cni_bin, sandbox_image=sandbox_image))
        self.socket.unlink(missing_ok=True)
        self._spawn("containerd", ["containerd", "--config", str(cfg)])
        self._wait(lambda: self.socket.exists() and self.ctr("version", check=False).returncode == 0,
                   time.monotonic() + 30, "containerd socket")

    def _import(self, img: images.BuiltImage) -> None:
        """Import the image's archive once, and forget the older builds of the same repository (containerd
        then collects their layers that no image or container still uses), so that the store kept in the
        cache does not grow by a 7 GB trainer image at every source change."""
        have = self.ctr("images", "ls", "-q").stdout.split()
        if img.ref not in have:
            self.ctr("images", "import", str(img.archive))
            have = self.ctr("images", "ls", "-q").stdout.split()
            if img.ref not in have:
                raise RealNodeError(f"importing {img.archive} did not give image {img.ref}: {' '.join(have)}")
        stale = older_builds(have, img.ref)
        if stale:
            self.ctr("images", "rm", *stale, check=False)

    def _start_kubelet(self, kubelet: Path) -> None:
        pki = PKI.load(self.cluster.workdir / "pki")
        client = pki.issue(f"kubelet-{self.name}", f"system:node:{self.name}", orgs=["system:nodes"])
        serving = pki.issue(f"kubelet-{self.name}-serving", f"system:node:{self.name}", server=True, dns=[self.name], ips=[self.ip])
        kubeconfig = self.workdir / "kubelet.kubeconfig"
        kubeconfig.write_text(kubeconfig_yaml(self.cluster.server, pki.ca.cert, client.cert, client.key, f"system:node:{self.name}"))
        config = self.workdir / "kubelet.yaml"
        config.write_text(json.dumps(kubelet_config(ip=self.ip, socket=self.socket, ca=pki.ca.cert, serving_cert=serving.cert,
                                                    serving_key=serving.key, pod_logs=self.workdir / "pod-logs",
                                                    cluster_dns=DNS_SERVICE_IP if self.dns else None), indent=2))
        labels = f"{NODE_LABEL}={NODE_KIND}"
        argv = [str(kubelet), f"--config={config}", f"--kubeconfig={kubeconfig}", f"--root-dir={self.workdir / 'kubelet'}",
                f"--cert-dir={self.workdir / 'kubelet-pki'}", f"--hostname-override={self.name}", f"--node-ip={self.ip}",
                f"--node-labels={labels}", "--v=2"]
        if self.taint:
            argv.append("--register-with-taints=finetune.io/real-node=true:NoSchedule")
        self._spawn("kubelet", argv)

    def _client_kubeconfig(self, who: str, user: str, orgs: list[str] | None = None) -> Path:
        pki = PKI.load(self.cluster.workdir / "pki")
        cert = pki.issue(f"{who}-{self.name}", user, orgs=orgs or [])
        path = self.workdir / f"{who}.kubeconfig"
        path.write_text(kubeconfig_yaml(self.cluster.server, pki.ca.cert, cert.cert, cert.key, user))
        return path

    def _start_kube_proxy(self, binary: Path) -> None:
        """kube-proxy as ``system:kube-proxy`` (the bootstrap ClusterRole system:node-proxier is bound to
        that user), its rules for the whole machine."""
        kubeconfig = self._client_kubeconfig("kube-proxy", "system:kube-proxy")
        config = self.workdir / "kube-proxy.yaml"
        config.write_text(json.dumps(kube_proxy_config(name=self.name, ip=self.ip, kubeconfig=kubeconfig), indent=2))
        self._kube_proxy_binary = binary
        self._spawn("kube-proxy", [str(binary), f"--config={config}", "--v=1"])

    def _kube_proxy_healthy(self) -> bool:
        with urllib.request.urlopen(f"http://{self.ip}:{KUBE_PROXY_HEALTHZ_PORT}/healthz", timeout=2) as resp:
            return resp.status == 200

    def _publish_apiserver_endpoint(self) -> None:
        """The `kubernetes` Service's endpoint on this node's address, when the API server listens there."""
        if self.cluster.apiserver_bind_address not in ("0.0.0.0", self.ip):
            return
        slice_ = apiserver_endpoint_slice(self.ip, int(self.cluster.ports["apiserver"]))
        path = "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices"
        code, _ = self.cluster.request("GET", f"{path}/kubernetes", timeout=5)
        code, body = (self.cluster.request("PUT", f"{path}/kubernetes", slice_, timeout=5) if code == 200
                      else self.cluster.request("POST", path, slice_, timeout=5))
        if code not in (200, 201):
            raise RealNodeError(f"publishing the kubernetes Service's endpoint failed ({code}): {body}")

    def _start_dns(self, image: str) -> None:
        """CoreDNS's objects (server-side apply), then wait for its pod Ready and an answer through the
        kube-dns Service (the host's own query goes through kube-proxy's rules like a pod's)."""
        for obj in coredns_manifests(image=image, node=self.name):
            code, body = self.cluster.request("PATCH", f"{object_path(obj)}?fieldManager={DNS_MANAGED_BY}&force=true", obj,
                                              content_type="application/apply-patch+yaml", timeout=10)
            if code not in (200, 201):
                raise RealNodeError(f"applying {obj['kind']} {obj['metadata']['name']} failed ({code}): {body}")
            self._dns_objects.append(obj)
        name = f"kubernetes.default.svc.{CLUSTER_DOMAIN}"

        def answers() -> bool:
            rcode, addrs = dns_query(DNS_SERVICE_IP, name, timeout=1)
            return rcode == 0 and bool(addrs)

        self._wait(answers, time.monotonic() + self.startup_timeout, f"CoreDNS answering {name} at {DNS_SERVICE_IP}")

    def _stop_dns(self) -> None:
        """Delete CoreDNS's objects, the Deployment first (its pod goes with the node's drain)."""
        for obj in reversed(self._dns_objects):
            try:
                self.cluster.request("DELETE", object_path(obj), {"propagationPolicy": "Background"}, timeout=5)
            except OSError:
                pass
        self._dns_objects = []

    def _wait(self, check, deadline: float, what: str) -> None:
        err: Exception | None = None
        while True:
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead:
                raise RealNodeError(f"{', '.join(dead)} exited while waiting for {what}\n{self._diagnostics()}")
            try:
                if check():
                    return
            except Exception as e:  # noqa: BLE001 - reported on timeout
                err = e
            if time.monotonic() > deadline:
                raise RealNodeError(f"timed out waiting for {what} (last error: {err!r})\n{self._diagnostics()}")
            time.sleep(0.5)

    def _ready(self) -> bool:
        code, node = self.cluster.request("GET", f"/api/v1/nodes/{self.name}", timeout=5)
        if code != 200:
            return False
        conds = {c["type"]: c["status"] for c in node.get("status", {}).get("conditions", [])}
        return conds.get("Ready") == "True"

    def _wait_ready(self, deadline: float) -> None:
        self._wait(self._ready, deadline, f"node {self.name} Ready")

    def _diagnostics(self) -> str:
        return "\n".join(f"----- {n} (rc={p.poll()}) -----\n{self.log(n)}" for n, p in self.procs.items())

    def stop(self) -> None:
        """Delete this node's pods (the kubelet stops their sandboxes: CNI teardown), then stop the
        kubelet, kill what containerd still runs, stop containerd, remove its /run folder (when nothing is
        mounted there), the bridge and the Node."""
        self._stop_dns()
        kubelet = self.procs.get("kubelet")
        if kubelet is not None and kubelet.poll() is None:
            self._drain(timeout=30)
        for name in ("kube-proxy", "kubelet"):
            self._terminate(name)
        if "kube-proxy" in self.procs:  # its rules outlive it: remove them
            subprocess.run([str(self._kube_proxy_binary), "--cleanup", f"--config={self.workdir / 'kube-proxy.yaml'}"],
                           capture_output=True, timeout=60)
        if self.procs.get("containerd") is not None and self.procs["containerd"].poll() is None:
            for kind in ("tasks",):
                ids = self.ctr(kind, "ls", "-q", check=False).stdout.split()
                for cid in ids:
                    self.ctr("tasks", "kill", "-s", "SIGKILL", cid, check=False, timeout=30)
                for cid in ids:
                    self.ctr("tasks", "delete", "-f", cid, check=False, timeout=30)
        self._terminate("containerd")
        self._remove_run_dir()
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
        try:
            self.cluster.request("DELETE", f"/api/v1/nodes/{self.name}", timeout=5)
        except OSError:
            pass

    def _remove_run_dir(self) -> None:
        """containerd's socket and state in /run. A sandbox's /dev/shm (a tmpfs, nothing but that pod's
        shared memory) that containerd did not unmount before it stopped is unmounted; the folder is left in
        place while anything else is still mounted under it (a container rootfs that did not unmount), so
        nothing of a container is deleted through it."""
        prefix = f"{self.run_dir}/"
        for source, target, fstype in _mounts_under(prefix):
            if fstype == "tmpfs" and source == "shm" and target.endswith("/shm"):
                subprocess.run(["umount", target], capture_output=True, timeout=30)
        if _mounts_under(prefix):
            return
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def _drain(self, timeout: float) -> None:
        try:
            code, pods = self.cluster.request("GET", f"/api/v1/pods?fieldSelector=spec.nodeName={self.name}", timeout=5)
            if code != 200:
                return
            for p in pods.get("items", []):
                m = p["metadata"]
                self.cluster.request("DELETE", f"/api/v1/namespaces/{m['namespace']}/pods/{m['name']}",
                                     {"gracePeriodSeconds": 5}, timeout=5)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                code, pods = self.cluster.request("GET", f"/api/v1/pods?fieldSelector=spec.nodeName={self.name}", timeout=5)
                if code != 200 or not pods.get("items"):
                    return
                time.sleep(0.5)
        except OSError:
            return

    def _terminate(self, name: str) -> None:
        p = self.procs.get(name)
        if p is None or p.poll() is not None:
            return
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=5)
