"""The real node's and the image build's pure parts: config files and the content hash (nothing started)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from finetune_devcluster import images, realnode, tools

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")


def test_copy_sources_are_read_from_the_dockerfiles():
    assert images.copy_sources(images.IMAGES["operator"].dockerfile) == ["constraints.txt", "pyproject.toml", "README.md", "operator/"]
    assert images.copy_sources(images.IMAGES["trainer"].dockerfile) == [
        "constraints.txt", "pyproject.toml", "README.md", "operator/", "trainer-image/finetune_trainer/"]


def test_image_hash_follows_only_what_the_dockerfile_copies(tmp_path: Path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "pkg" / "m.py").write_text("x = 1")
    (tmp_path / "other.txt").write_text("o")
    df = tmp_path / "Dockerfile"
    df.write_text("FROM base\nCOPY a.txt ./\n# COPY other.txt ./\nCOPY --from=build /x /x\nCOPY pkg/ \\\n  pkg/\n")
    spec = images.ImageSpec("t", df, "BASE")
    h0 = images.image_hash(spec, "base:1", root=tmp_path)
    (tmp_path / "other.txt").write_text("changed")  # not copied
    (tmp_path / "pkg" / "__pycache__").mkdir()
    (tmp_path / "pkg" / "__pycache__" / "m.cpython-311.pyc").write_bytes(b"\0")  # .dockerignore'd
    assert images.image_hash(spec, "base:1", root=tmp_path) == h0
    assert images.image_hash(spec, "base:2", root=tmp_path) != h0
    assert images.image_hash(spec, "base:1", {"PIP_VERSION": "1"}, root=tmp_path) != h0
    (tmp_path / "pkg" / "m.py").write_text("x = 2")
    h1 = images.image_hash(spec, "base:1", root=tmp_path)
    assert h1 != h0
    (tmp_path / "pkg" / "new.py").write_text("")
    assert images.image_hash(spec, "base:1", root=tmp_path) != h1


def test_containerd_config_is_toml_with_what_this_machine_needs(tmp_path: Path):
    text = realnode.containerd_config(root=tmp_path / "root", state=Path("/run/x/state"), socket=Path("/run/x/c.sock"),
                                      cni_conf_dir=tmp_path / "cni", cni_bin_dir="/usr/lib/cni", sandbox_image="localhost/p:v1")
    cfg = tomllib.loads(text)
    cri = cfg["plugins"]["io.containerd.grpc.v1.cri"]
    assert cfg["version"] == 2 and cfg["grpc"]["address"] == "/run/x/c.sock"
    assert cri["restrict_oom_score_adj"] is True  # no CAP_SYS_RESOURCE: runc fails every sandbox otherwise
    assert cri["sandbox_image"] == "localhost/p:v1"
    assert cri["containerd"]["runtimes"]["runc"]["options"]["SystemdCgroup"] is False
    assert cri["cni"]["conf_dir"] == str(tmp_path / "cni")


def test_kubelet_config_and_network_of_a_node(tmp_path: Path):
    ip = realnode.node_ip(1)
    assert not ipaddress.ip_address(ip).is_loopback  # the kubelet refuses loopback
    assert ipaddress.ip_address(ip) in ipaddress.ip_network(realnode.pod_subnet(1))  # the bridge's gateway
    cfg = realnode.kubelet_config(ip=ip, socket=Path("/run/x/c.sock"), ca=tmp_path / "ca.crt", serving_cert=tmp_path / "s.crt",
                                  serving_key=tmp_path / "s.key", pod_logs=tmp_path / "logs")
    assert cfg["address"] == ip and cfg["containerRuntimeEndpoint"] == "unix:///run/x/c.sock"
    assert (cfg["cgroupDriver"], cfg["cgroupsPerQOS"], cfg["enforceNodeAllocatable"], cfg["failSwapOn"]) == ("cgroupfs", False, [], False)
    assert cfg["authentication"]["anonymous"]["enabled"] is False and cfg["authorization"]["mode"] == "Webhook"
    assert cfg["readOnlyPort"] == 0
    cni = realnode.cni_config("n", "ftbr1", realnode.pod_subnet(1), tmp_path / "ipam")
    (bridge,) = cni["plugins"]
    assert bridge["type"] == "bridge" and bridge["isGateway"] and not bridge["ipMasq"]
    assert bridge["ipam"]["ranges"] == [[{"subnet": "10.245.1.0/24"}]]


def _go_mod_pins(go_mod: Path) -> dict[str, str]:
    """module -> version of every require and replace line (replace: the version it is replaced with)."""
    pins: dict[str, str] = {}
    for line in go_mod.read_text().splitlines():
        words = line.split("//")[0].split()
        if "=>" in words:  # old [v] => new v
            old, new = words[0], words[words.index("=>") + 1:]
            pins[f"{old} =>"] = " ".join(new)
        elif len(words) == 2 and words[1].startswith("v"):
            pins[words[0]] = words[1]
        elif len(words) == 3 and words[0] == "require":
            pins[words[1]] = words[2]
    return pins


def test_kubelet_module_pins_what_the_control_plane_module_pins():
    """gotools/kubelet is its own module (so `make tools` keeps the control plane's recipe), but the
    kubelet must be the same Kubernetes as the API server: every module both name has one version."""
    k8s = _go_mod_pins(tools.GOTOOLS / "k8s" / "go.mod")
    kubelet = _go_mod_pins(tools.GOTOOLS / "kubelet" / "go.mod")
    assert kubelet["k8s.io/kubernetes"] == k8s["k8s.io/kubernetes"] == tools.K8S_VERSION
    replaces = {m for m in k8s if m.endswith(" =>")}
    assert replaces and replaces <= set(kubelet)
    assert {m: kubelet[m] for m in kubelet if m in k8s} == {m: k8s[m] for m in kubelet if m in k8s}
    assert tools.BUNDLES["kubelet"].inputs == (tools.GOTOOLS / "kubelet" / "go.mod", tools.GOTOOLS / "kubelet" / "go.sum")


def test_kube_proxy_leaves_the_machines_conntrack_and_localnet_alone(tmp_path: Path):
    cfg = realnode.kube_proxy_config(name="real-node-0", ip="10.245.0.1", kubeconfig=tmp_path / "kp.kubeconfig")
    assert cfg["mode"] == "iptables" and cfg["hostnameOverride"] == "real-node-0"
    # 0 means "do not touch" for every conntrack setting (no sysctl writes on a shared machine)
    assert all(not v or v == "0s" for v in cfg["conntrack"].values())
    # node ports only on the node's own address: kube-proxy then never sets route_localnet
    assert cfg["nodePortAddresses"] == ["10.245.0.1/32"] and cfg["iptables"]["localhostNodePorts"] is False
    assert cfg["healthzBindAddress"].startswith("10.245.0.1:") and cfg["clientConnection"]["kubeconfig"].endswith("kp.kubeconfig")


def test_the_apiserver_endpoint_is_the_kubernetes_services_own_slice():
    s = realnode.apiserver_endpoint_slice("10.245.0.1", 6443)
    assert s["metadata"]["labels"]["kubernetes.io/service-name"] == "kubernetes" and s["metadata"]["namespace"] == "default"
    assert s["endpoints"] == [{"addresses": ["10.245.0.1"], "conditions": {"ready": True}}]
    assert s["ports"] == [{"name": "https", "port": 6443, "protocol": "TCP"}]  # named like the Service's port
    assert not ipaddress.ip_address(s["endpoints"][0]["addresses"][0]).is_loopback


def test_kubelet_config_points_pods_at_the_cluster_dns_only_when_asked(tmp_path: Path):
    kw = dict(ip="10.245.0.1", socket=Path("/run/x/c.sock"), ca=tmp_path / "ca.crt", serving_cert=tmp_path / "s.crt",
              serving_key=tmp_path / "s.key", pod_logs=tmp_path / "logs")
    assert "clusterDNS" not in realnode.kubelet_config(**kw)
    cfg = realnode.kubelet_config(**kw, cluster_dns=realnode.DNS_SERVICE_IP)
    assert cfg["clusterDNS"] == ["10.96.0.10"] and cfg["clusterDomain"] == "cluster.local"


def test_the_dns_service_ip_is_in_the_service_range_and_not_the_apiservers():
    from finetune_devcluster import components

    assert ipaddress.ip_address(realnode.DNS_SERVICE_IP) in ipaddress.ip_network(components.SERVICE_CIDR)
    assert realnode.DNS_SERVICE_IP != components.SERVICE_IP


def test_corefile_serves_the_cluster_domain_and_refuses_to_forward():
    cf = realnode.coredns_corefile()
    assert cf.startswith("cluster.local:53 in-addr.arpa:53 ip6.arpa:53 {")
    assert "kubernetes cluster.local in-addr.arpa ip6.arpa {" in cf and "pods insecure" in cf
    assert f"health :{realnode.DNS_HEALTH_PORT}" in cf and f"ready :{realnode.DNS_READY_PORT}" in cf
    assert "forward" not in cf  # nothing off this machine answers: the rest is NXDOMAIN at once
    assert ".:53 {" in cf and "rcode NXDOMAIN" in cf
    assert cf.count("{") == cf.count("}")
    # every plugin the Corefile names is linked into gotools/coredns
    main_go = (tools.GOTOOLS / "coredns" / "main.go").read_text()
    for plugin in ("errors", "health", "ready", "kubernetes", "cache", "loadbalance", "template"):
        assert f'"github.com/coredns/coredns/plugin/{plugin}"' in main_go and f'"{plugin}"' in main_go


def test_coredns_manifests_are_a_kube_dns_service_and_a_pinned_non_root_deployment():
    objs = realnode.coredns_manifests(image="localhost/finetune-coredns:v1", node="real-node-0")
    by_kind = {o["kind"]: o for o in objs}
    assert list(by_kind) == ["ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ConfigMap", "Service", "Deployment"]
    svc = by_kind["Service"]
    assert (svc["metadata"]["name"], svc["metadata"]["namespace"], svc["spec"]["clusterIP"]) == ("kube-dns", "kube-system", "10.96.0.10")
    assert {(p["protocol"], p["port"]) for p in svc["spec"]["ports"]} == {("UDP", 53), ("TCP", 53)}
    rules = {(g, r) for rule in by_kind["ClusterRole"]["rules"] for g in rule["apiGroups"] for r in rule["resources"]}
    assert {("discovery.k8s.io", "endpointslices"), ("", "services"), ("", "namespaces"), ("", "pods")} <= rules
    assert all(set(rule["verbs"]) == {"list", "watch"} for rule in by_kind["ClusterRole"]["rules"])  # read-only
    (subject,) = by_kind["ClusterRoleBinding"]["subjects"]
    assert subject == {"kind": "ServiceAccount", "name": "coredns", "namespace": "kube-system"}
    assert by_kind["ConfigMap"]["data"]["Corefile"] == realnode.coredns_corefile()
    pod = by_kind["Deployment"]["spec"]["template"]["spec"]
    assert by_kind["Deployment"]["spec"]["selector"]["matchLabels"] == svc["spec"]["selector"]
    assert pod["serviceAccountName"] == "coredns" and pod["nodeSelector"] == {"kubernetes.io/hostname": "real-node-0"}
    (c,) = pod["containers"]
    assert c["image"] == "localhost/finetune-coredns:v1" and c["imagePullPolicy"] == "Never"
    assert c["securityContext"]["runAsNonRoot"] and c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert pod["securityContext"]["sysctls"] == [{"name": "net.ipv4.ip_unprivileged_port_start", "value": "53"}]
    assert c["readinessProbe"]["httpGet"]["port"] == realnode.DNS_READY_PORT
    assert realnode.object_path(svc) == "/api/v1/namespaces/kube-system/services/kube-dns"
    assert realnode.object_path(by_kind["ClusterRole"]) == "/apis/rbac.authorization.k8s.io/v1/clusterroles/system:coredns"


def test_dns_query_reads_a_answers_from_a_local_server():
    import socket
    import struct
    import threading

    srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    srv.bind(("127.0.0.1", 0))

    def answer():
        q, peer = srv.recvfrom(512)
        name_end = q.index(b"\0", 12) + 5
        rr = b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 30, 4) + socket.inet_aton("10.245.0.7")
        srv.sendto(q[:2] + struct.pack(">HHHHH", 0x8180, 1, 1, 0, 0) + q[12:name_end] + rr, peer)

    t = threading.Thread(target=answer)
    t.start()
    try:
        assert realnode.dns_query("127.0.0.1", "a.b.svc.cluster.local", port=srv.getsockname()[1]) == (0, ["10.245.0.7"])
    finally:
        t.join(5)
        srv.close()
