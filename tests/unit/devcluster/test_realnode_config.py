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
