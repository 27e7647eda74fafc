"""Cluster DNS on the real node (realnode.py ``dns``): CoreDNS as a Deployment on the node behind the
``kube-dns`` Service (10.96.0.10), the kubelet's ``clusterDNS``, kube-proxy's rules between them.

What a multi-node training job needs from it, checked with the operator's own builders: the headless
Service's name resolves to every pod, and the rendezvous address torchrun gets
(``<job>-<attempt>-0.<service>.<namespace>.svc``, through the pod's search domains) resolves to pod 0 of
an Indexed Job, and a TCP connection to it gets there. A ClusterIP Service's name resolves to its
address, and a connection through kube-proxy's DNAT reaches a pod on the same bridge, from another pod
and from the serving pod itself (hairpin). A name outside the cluster is NXDOMAIN at once.

Marked ``realnode``: run with ``FINETUNE_REALNODE=1`` (``make test-realnode``), as root.
"""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from finetune_api.spec import parse_spec
from finetune_devcluster import realnode as rn
from finetune_devcluster.procnode import NODE_LABEL
from finetune_devcluster.realnode import NODE_KIND, RealNode
from finetune_operator import builders
from tests.conftest import _raise_build_errors
from tests.integration.kubeutil import wait_for
from tests.integration.test_realnode import TAINT, operator_image  # noqa: F401 - the module's image fixture

pytestmark = [pytest.mark.cluster, pytest.mark.realnode, pytest.mark.slow]


@pytest.fixture(scope="module")
def dns_node(cluster, operator_image):  # noqa: F811
    _raise_build_errors("kubelet", "pause-image", "coredns-image")
    node = RealNode(cluster, 0, images_to_load=[operator_image], taint=True).start()
    assert node.dns
    print(f"real node {node.name} Ready with DNS in {node.timings['ready_s']:.1f}s "
          f"(CoreDNS answering {node.timings['dns_ready_s']:.1f}s after the node was Ready)")
    yield node
    node.stop()


def _on_node(spec: dict) -> dict:
    return {"nodeSelector": {NODE_LABEL: NODE_KIND}, "tolerations": [{"key": TAINT, "operator": "Exists"}],
            "automountServiceAccountToken": False, "terminationGracePeriodSeconds": 2, **spec}


def _container(image: str, name: str, script: str, **kw) -> dict:
    return {"name": name, "image": image, "imagePullPolicy": "Never", "command": ["python", "-u", "-c", script],
            "securityContext": {"runAsNonRoot": True, "readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False,
                                "capabilities": {"drop": ["ALL"]}}, **kw}


def _apply(cluster, *objs: dict) -> None:
    cluster.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": list(objs)}))


def _pod(cluster, ns: str, name: str) -> dict:
    return json.loads(cluster.kubectl("get", "pod", "-n", ns, name, "-o", "json").stdout)


def _finished(cluster, ns: str, name: str, timeout: float = 120) -> dict:
    def done():
        p = _pod(cluster, ns, name)
        return p if p["status"].get("phase") in ("Succeeded", "Failed") else None

    return wait_for(f"pod {name} finished", done, timeout=timeout)


def test_coredns_runs_on_the_node_behind_kube_dns(cluster, dns_node):
    svc = json.loads(cluster.kubectl("get", "svc", "-n", "kube-system", "kube-dns", "-o", "json").stdout)
    assert svc["spec"]["clusterIP"] == rn.DNS_SERVICE_IP == "10.96.0.10"
    pods = json.loads(cluster.kubectl("get", "pods", "-n", "kube-system", "-l", "k8s-app=kube-dns", "-o", "json").stdout)["items"]
    assert [p["spec"]["nodeName"] for p in pods] == [dns_node.name]
    (pod,) = pods
    assert pod["spec"]["serviceAccountName"] == "coredns"
    assert {c["type"]: c["status"] for c in pod["status"]["conditions"]}["Ready"] == "True"
    # from the host, through kube-proxy's rules, like a pod's lookup
    assert rn.dns_query(rn.DNS_SERVICE_IP, "kubernetes.default.svc.cluster.local") == (0, ["10.96.0.1"])
    t0 = time.monotonic()
    assert rn.dns_query(rn.DNS_SERVICE_IP, "example.com") == (3, [])  # NXDOMAIN, no forwarding off the machine
    assert time.monotonic() - t0 < 1.5


RANK_SCRIPT = r"""
import os, socket, sys, time
rank = int(os.environ["JOB_COMPLETION_INDEX"])
master, port, headless = sys.argv[1], int(sys.argv[2]), sys.argv[3]
print("resolv.conf:", open("/etc/resolv.conf").read().replace("\n", " | "))
if rank == 0:
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("0.0.0.0", port)); s.listen(1)
    conn, peer = s.accept(); print("rank0 got", conn.recv(64).decode(), "from", peer[0]); conn.sendall(b"welcome")
    conn.close()
else:
    deadline = time.time() + 60
    while True:  # as torchrun does: retry until rank 0's name resolves and it listens
        try:
            addr = socket.gethostbyname(master)
            c = socket.create_connection((master, port), timeout=3); break
        except OSError as e:
            if time.time() > deadline: raise
            time.sleep(0.5)
    c.sendall(b"hello"); print("master", master, "=", addr, "reply", c.recv(64).decode())
    print("headless", headless, "=", sorted({a[4][0] for a in socket.getaddrinfo(headless, port, socket.AF_INET)}))
"""


def test_rendezvous_address_of_a_training_job_resolves_to_pod_zero(cluster, dns_node, operator_image, namespace):  # noqa: F811
    """The operator's headless Service and its rendezvous name for pod 0 of attempt 0's Indexed Job."""
    owner = builders.Owner(name="dnsft", namespace=namespace, uid="u-dns")
    spec = parse_spec({"model": {"uri": "s3://models/x"}, "dataset": {"train": "s3://data/t.jsonl"}, "output": {"uri": "s3://out/x"},
                       "resources": {"nodes": 2}})
    master = next(a.split("=", 1)[1] for a in builders.trainer_command(owner, spec, 0) if a.startswith("--master-addr="))
    port = builders.MASTER_PORT
    assert master == f"dnsft-0-0.dnsft.{namespace}.svc"  # <job>-<index>.<service>.<namespace>.svc
    service = builders.build_service(owner)
    service["metadata"].pop("ownerReferences")  # no FineTuneJob here: the garbage collector would delete it
    labels = service["spec"]["selector"]
    headless = f"{builders.service_name(owner)}.{namespace}.svc.cluster.local"
    job = {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": builders.job_name(owner, 0), "namespace": namespace},
        "spec": {
            "completionMode": "Indexed", "completions": 2, "parallelism": 2, "backoffLimit": 0,
            "template": {"metadata": {"labels": labels}, "spec": _on_node({
                "restartPolicy": "Never", "subdomain": builders.service_name(owner),  # as builders.build_job sets it
                "containers": [_container(operator_image.ref, "rank", RANK_SCRIPT, args=[master, str(port), headless])],
            })},
        },
    }
    t0 = time.monotonic()
    _apply(cluster, service, job)

    def pods():
        items = json.loads(cluster.kubectl("get", "pods", "-n", namespace, "-l", f"job-name={job['metadata']['name']}",
                                           "-o", "json").stdout)["items"]
        done = [p for p in items if p["status"].get("phase") in ("Succeeded", "Failed")]
        return items if len(done) == 2 else None

    items = wait_for("both ranks finished", pods, timeout=180)
    took = time.monotonic() - t0
    by_rank = {p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"]: p for p in items}
    logs = {r: cluster.kubectl("logs", "-n", namespace, p["metadata"]["name"]).stdout for r, p in by_rank.items()}
    print(f"ranks finished in {took:.1f}s\n" + "\n".join(f"--- rank {r}\n{lg}" for r, lg in sorted(logs.items())))
    assert all(p["status"]["phase"] == "Succeeded" for p in items), logs
    ip0, ip1 = by_rank["0"]["status"]["podIP"], by_rank["1"]["status"]["podIP"]
    assert by_rank["0"]["spec"]["hostname"] == "dnsft-0-0" and by_rank["0"]["spec"]["subdomain"] == "dnsft"
    assert f"master {master} = {ip0} reply welcome" in logs["1"]
    assert f"rank0 got hello from {ip1}" in logs["0"]  # same bridge, no NAT between pods
    assert f"headless {headless} = {sorted([ip0, ip1])}" in logs["1"]
    assert f"nameserver {rn.DNS_SERVICE_IP}" in logs["1"]
    assert f"search {namespace}.svc.cluster.local svc.cluster.local cluster.local" in logs["1"]


ECHO_SERVER = r"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("0.0.0.0", 8080)); s.listen(8)
while True:
    c, peer = s.accept(); c.sendall(f"{socket.gethostname()} saw {peer[0]}".encode()); c.close()
"""

ECHO_CLIENT = r"""
import socket, sys, time
for name in sys.argv[1:]:
    deadline = time.time() + 30
    while True:
        try:
            addr = socket.gethostbyname(name)
            c = socket.create_connection((name, 80), timeout=3); reply = c.recv(128).decode(); c.close(); break
        except OSError:
            if time.time() > deadline: raise
            time.sleep(0.5)
    print(f"{name} = {addr}: {reply}")
"""


def test_cluster_ip_service_name_resolves_and_connects_to_a_pod(cluster, dns_node, operator_image, namespace):  # noqa: F811
    labels = {"app": "echo"}
    server = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "echo", "namespace": namespace, "labels": labels},
              "spec": _on_node({"containers": [_container(operator_image.ref, "echo", ECHO_SERVER,
                                                           readinessProbe={"tcpSocket": {"port": 8080}, "periodSeconds": 1})]})}
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "echo", "namespace": namespace},
           "spec": {"selector": labels, "ports": [{"port": 80, "targetPort": 8080}]}}
    _apply(cluster, server, svc)
    wait_for("echo Ready", lambda: {c["type"]: c["status"] for c in _pod(cluster, namespace, "echo")["status"].get("conditions", [])
                                    }.get("Ready") == "True", timeout=120)
    cluster_ip = json.loads(cluster.kubectl("get", "svc", "-n", namespace, "echo", "-o", "json").stdout)["spec"]["clusterIP"]
    server_ip = _pod(cluster, namespace, "echo")["status"]["podIP"]
    names = ["echo", f"echo.{namespace}", f"echo.{namespace}.svc.cluster.local"]
    client = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "client", "namespace": namespace},
              "spec": _on_node({"restartPolicy": "Never", "containers": [_container(operator_image.ref, "client", ECHO_CLIENT,
                                                                                     args=names)]})}
    t0 = time.monotonic()
    _apply(cluster, client)
    p = _finished(cluster, namespace, "client")
    logs = cluster.kubectl("logs", "-n", namespace, "client").stdout
    print(f"client finished in {time.monotonic() - t0:.1f}s:\n{logs}")
    assert p["status"]["phase"] == "Succeeded", logs
    client_ip = p["status"]["podIP"]
    for name in names:  # kube-proxy's DNAT to the pod; the reply comes back un-NATed over the bridge
        assert f"{name} = {cluster_ip}: echo saw {client_ip}" in logs
    # hairpin: the serving pod through its own Service; kube-proxy masquerades that one (source = endpoint),
    # to the bridge's address, so the reply comes back through the host
    out = cluster.kubectl("exec", "-n", namespace, "echo", "--", "python", "-c", ECHO_CLIENT, f"echo.{namespace}.svc").stdout
    print(f"hairpin: {out}")
    assert f"echo.{namespace}.svc = {cluster_ip}: echo saw {dns_node.ip}" in out
    assert server_ip != dns_node.ip


def test_stopping_the_node_removes_the_cluster_dns(cluster, dns_node):
    """Last in this module (the fixture's own stop() then finds nothing left to do)."""
    dns_node.stop()
    for kind, ns, name in (("deployment", "kube-system", "coredns"), ("service", "kube-system", "kube-dns"),
                           ("configmap", "kube-system", "coredns"), ("serviceaccount", "kube-system", "coredns"),
                           ("clusterrole", None, "system:coredns"), ("clusterrolebinding", None, "system:coredns")):
        args = ["get", kind, name, *(["-n", ns] if ns else []), "--ignore-not-found", "-o", "name"]
        wait_for(f"{kind} {name} deleted", lambda: cluster.kubectl(*args).stdout.strip() == "", timeout=30)
    rules = subprocess.run(["iptables-save", "-t", "nat"], capture_output=True, text=True).stdout
    assert rn.DNS_SERVICE_IP not in rules and "KUBE-SERVICES" not in rules  # kube-proxy --cleanup
