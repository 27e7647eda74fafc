"""Kueue (sigs.k8s.io/kueue) as a local process against a :class:`~finetune_devcluster.cluster.LocalCluster`.

``LocalKueue(cluster)`` installs Kueue's CRDs (copied from the pinned module's source by the ``kueue``
tool bundle, tools.py), starts the Kueue manager binary (built from source, pinned, cached like the
control plane) with a Configuration that manages ``batch/job`` only and only Jobs that carry
``kueue.x-k8s.io/queue-name`` (``manageJobsWithoutQueueName: false``), waits for its ``/readyz`` (which
Kueue reports only once its webhook server listens), then registers Kueue's own admission webhooks.

Webhooks: in a real cluster the API server reaches Kueue's webhook Service; here there are no Services
backed by pods, so the webhook configurations (Kueue's generated ``config/components/webhook/manifests.yaml``,
from the same module) are registered with ``clientConfig.url: https://127.0.0.1:<port>/<path>`` and the
cluster CA as ``caBundle``. Only the webhooks of the API groups this setup serves are kept (``batch`` and
``kueue.x-k8s.io``): the others name kinds whose integrations are off (pods, deployments, ...), and a
webhook for pods that Kueue does not serve would fail every pod creation. So a Job is mutated and validated
by Kueue as in a real install, and so are ClusterQueues, LocalQueues, ResourceFlavors and Workloads.

Certificates: Kueue's internal cert management (cert-controller) is off: it injects CA bundles into the
CRDs' conversion webhooks, which the CRD bases do not have (Kueue's kustomize patches them in; everything
here uses the storage version, v1beta2, so no conversion is needed), and would never report ready
without them. Kueue then reads its webhook serving certificate from
``webhook.certDir`` (here: issued by the cluster's CA for 127.0.0.1) and its metrics serving certificate
from the fixed path ``/etc/kueue/metrics/certs`` (hard-coded in cmd/kueue/main.go; nothing else can be
configured), so that folder is written too (a throwaway pair from the same CA; needs write access to /etc,
as root has in CI). The visibility API server (an aggregated API server, feature gate VisibilityOnDemand) is
off: it needs the API server to front it.

Kueue authenticates with its own client certificate in ``system:masters`` (like kwok's identity here).
Stopping removes the webhook configurations first (their failurePolicy is Fail: with Kueue gone they would
block every Job write), then the process. The CRDs and Kueue's objects stay until the cluster goes.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from . import tools
from .components import kubeconfig_yaml
from .pki import PKI
from .procutil import LOOPBACK, die_with_parent, free_port, tail, wait_http_ready

if TYPE_CHECKING:
    from .cluster import LocalCluster

NAMESPACE = "kueue-system"
FRAMEWORKS = ("batch/job",)
# The API groups whose webhooks are registered (see the module docstring).
WEBHOOK_GROUPS = frozenset({"batch", "kueue.x-k8s.io"})
WEBHOOK_CONFIG_NAMES = {
    "MutatingWebhookConfiguration": "kueue-mutating-webhook-configuration",
    "ValidatingWebhookConfiguration": "kueue-validating-webhook-configuration",
}
# Where Kueue reads its metrics serving certificate when its internal cert management is off (cmd/kueue/main.go).
METRICS_CERT_DIR = Path("/etc/kueue/metrics/certs")


class KueueError(RuntimeError):
    """Kueue did not come up (the message carries its log tail)."""


def configuration(*, health_port: int, metrics_port: int, webhook_port: int, cert_dir: Path) -> dict[str, Any]:
    """Kueue's Configuration (config.kueue.x-k8s.io/v1beta2) for a manager on loopback."""
    return {
        "apiVersion": "config.kueue.x-k8s.io/v1beta2",
        "kind": "Configuration",
        "namespace": NAMESPACE,
        "health": {"healthProbeBindAddress": f"{LOOPBACK}:{health_port}"},
        "metrics": {"bindAddress": f"{LOOPBACK}:{metrics_port}"},
        "webhook": {"host": LOOPBACK, "port": webhook_port, "certDir": str(cert_dir)},
        "leaderElection": {"leaderElect": False},
        "internalCertManagement": {"enable": False},
        "manageJobsWithoutQueueName": False,
        "integrations": {"frameworks": list(FRAMEWORKS)},
        "featureGates": {"VisibilityOnDemand": False},
        # the defaults (20/30) are fine for a handful of jobs; as the control plane's other clients
        "clientConnection": {"qps": 50, "burst": 100},
    }


def argv(binary: Path, config: Path) -> list[str]:
    return [str(binary), f"--config={config}", "--zap-log-level=info"]


def webhook_configurations(manifests: str, *, port: int, ca_pem: bytes) -> list[dict[str, Any]]:
    """Kueue's generated webhook configurations, pointed at ``https://127.0.0.1:<port>`` and kept to the
    webhooks of WEBHOOK_GROUPS (see the module docstring)."""
    out = []
    ca = base64.b64encode(ca_pem).decode()
    for doc in yaml.safe_load_all(manifests):
        if not doc:
            continue
        hooks = []
        for hook in doc.get("webhooks") or []:
            groups = {g for rule in hook.get("rules") or [] for g in rule.get("apiGroups") or []}
            if not groups & WEBHOOK_GROUPS:
                continue
            path = hook["clientConfig"]["service"]["path"]
            hooks.append({**hook, "clientConfig": {"url": f"https://{LOOPBACK}:{port}{path}", "caBundle": ca}})
        doc = {**doc, "metadata": {"name": WEBHOOK_CONFIG_NAMES[doc["kind"]]}, "webhooks": hooks}
        out.append(doc)
    return out


class LocalKueue:
    """The Kueue manager for ``cluster`` (see the module docstring). A context manager, like LocalCluster."""

    def __init__(self, cluster: LocalCluster, workdir: str | Path | None = None, *, startup_timeout: float = 120.0) -> None:
        self.cluster = cluster
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="kueue-", dir=cluster.workdir)).resolve()
        self.startup_timeout = startup_timeout
        self.ports: dict[str, int] = {}
        self.proc: subprocess.Popen | None = None

    @property
    def log(self) -> Path:
        return self.workdir / "kueue.log"

    @property
    def health_url(self) -> str:
        return f"http://{LOOPBACK}:{self.ports['health']}"

    def __enter__(self) -> LocalKueue:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ------------------------------------------------------------------------------ start
    def start(self) -> LocalKueue:
        binary = tools.ensure("kueue")
        bundle = tools.ensure_bundle("kueue")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.install_crds(bundle / "crds")
        self._ok("POST", "/api/v1/namespaces", {"metadata": {"name": NAMESPACE}}, allow=(409,))
        pki = PKI.load(self.cluster.workdir / "pki")
        cert_dir = self.workdir / "webhook-certs"
        cert_dir.mkdir(exist_ok=True)
        self._serving_pair(pki, cert_dir)
        self._metrics_pair(pki)
        client = pki.issue("kueue-client", "kueue-controller-manager", orgs=["system:masters"])
        kubeconfig = self.workdir / "kubeconfig"
        kubeconfig.write_text(kubeconfig_yaml(self.cluster.server, pki.ca.cert, client.cert, client.key, "kueue"))

        self.ports = {"health": free_port(), "metrics": free_port(), "webhook": free_port()}
        config = self.workdir / "config.yaml"
        config.write_text(json.dumps(configuration(
            health_port=self.ports["health"], metrics_port=self.ports["metrics"],
            webhook_port=self.ports["webhook"], cert_dir=cert_dir), indent=2))
        env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(argv(binary, config), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         cwd=self.workdir, env=env, start_new_session=True, preexec_fn=die_with_parent)
        try:
            self._wait_ready()
            manifests = (bundle / "webhook" / "manifests.yaml").read_text()
            for cfg in webhook_configurations(manifests, port=self.ports["webhook"], ca_pem=pki.ca.cert.read_bytes()):
                self.cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", input=json.dumps(cfg))
        except Exception:
            self.stop()
            raise
        return self

    def install_crds(self, crd_dir: Path) -> None:
        """Kueue's CRDs (server-side: the Workload CRD is too big for client-side apply's annotation)."""
        self.cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(crd_dir), timeout=120)
        names = [yaml.safe_load(p.read_text())["metadata"]["name"] for p in sorted(crd_dir.glob("*.yaml"))]
        deadline = time.monotonic() + 60
        for name in names:
            while True:
                code, crd = self.cluster.request("GET", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}")
                conds = {c["type"]: c["status"] for c in ((crd or {}).get("status") or {}).get("conditions") or []} if code == 200 else {}
                if conds.get("Established") == "True":
                    break
                if time.monotonic() > deadline:
                    raise KueueError(f"CRD {name} not Established after 60s: HTTP {code}")
                time.sleep(0.2)

    def _serving_pair(self, pki: PKI, cert_dir: Path) -> None:
        pair = pki.issue("kueue-webhook", "kueue-webhook", server=True, dns=["localhost"], ips=[LOOPBACK])
        (cert_dir / "tls.crt").write_bytes(pair.cert.read_bytes())
        (cert_dir / "tls.key").write_bytes(pair.key.read_bytes())
        (cert_dir / "tls.key").chmod(0o600)

    def _metrics_pair(self, pki: PKI) -> None:
        """The pair at Kueue's fixed metrics path; replaced atomically (another cluster's Kueue may read it)."""
        pair = pki.issue("kueue-metrics", "kueue-metrics", server=True, dns=["localhost"], ips=[LOOPBACK])
        try:
            METRICS_CERT_DIR.mkdir(parents=True, exist_ok=True)
            for src, name in ((pair.cert, "tls.crt"), (pair.key, "tls.key")):
                tmp = METRICS_CERT_DIR / f".{name}.{os.getpid()}"
                tmp.write_bytes(src.read_bytes())
                tmp.chmod(0o600)
                tmp.replace(METRICS_CERT_DIR / name)
        except OSError as e:
            raise KueueError(
                f"cannot write Kueue's metrics certificate to {METRICS_CERT_DIR} ({e}): with its internal cert "
                "management off, Kueue reads it only from there; run as a user that may write it (root in CI)"
            ) from e

    def _wait_ready(self) -> None:
        wait_http_ready(f"{self.health_url}/readyz", proc=self.proc, timeout=self.startup_timeout, what="kueue", log=self.log,
                        error=KueueError)

    def _ok(self, method: str, path: str, body: Any = None, allow: tuple[int, ...] = ()) -> Any:
        code, out = self.cluster.request(method, path, body)
        if code >= 300 and code not in allow:
            raise KueueError(f"{method} {path} -> HTTP {code}: {out}")
        return out

    # ------------------------------------------------------------------------------- state
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.health_url}/readyz", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError, KeyError):
            return False

    def wait_workloads_released(self, timeout: float = 30.0) -> list[str]:
        """Wait until no Workload is left in a namespace being deleted (Kueue removes its finalizer);
        returns those still there after ``timeout`` (``namespace/name``)."""
        deadline = time.monotonic() + timeout
        while True:
            _, nss = self.cluster.request("GET", "/api/v1/namespaces")
            terminating = {n["metadata"]["name"] for n in (nss or {}).get("items", []) if n.get("status", {}).get("phase") == "Terminating"}
            _, wls = self.cluster.request("GET", "/apis/kueue.x-k8s.io/v1beta2/workloads")
            left = [f"{w['metadata']['namespace']}/{w['metadata']['name']}" for w in (wls or {}).get("items", [])
                    if w["metadata"]["namespace"] in terminating]
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(0.5)

    def logs(self, lines: int = 50) -> str:
        return tail(self.log, lines)

    # -------------------------------------------------------------------------------- stop
    def stop(self) -> None:
        """Webhook configurations first (see the module docstring), then SIGTERM (SIGKILL after 10 s)."""
        for kind, name in WEBHOOK_CONFIG_NAMES.items():
            try:
                self.cluster.request("DELETE", f"/apis/admissionregistration.k8s.io/v1/{kind.lower()}s/{name}")
            except OSError:  # the API server is gone already: so are the webhooks
                pass
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
