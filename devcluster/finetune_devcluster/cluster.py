"""A real Kubernetes control plane on loopback, with kwok-simulated GPU nodes.

``LocalCluster`` runs etcd, kube-apiserver (TLS, client-certificate auth, ``Node,RBAC`` authorization,
the default admission plugins plus NodeRestriction), kube-controller-manager (all default controllers,
each with its own service-account credentials), kube-scheduler and the kwok controller, then registers
fake nodes that kwok keeps Ready. Pods scheduled onto them go Pending -> Running (they get a pod IP) and
stay Running until a test ends them:

* ``cluster.pod_succeed(ns, name)`` -> phase Succeeded, every container terminated with exit code 0;
* ``cluster.pod_fail(ns, name, exit_code=1, message="boom")`` -> phase Failed, exit code/message set.

Both set annotations (``EXIT_ANNOTATION`` and friends, see kwok.py) that a custom kwok Stage reacts to, so a pod
template can also carry them from the start (the pod then ends as soon as it is Running, or after
``finetune.io/kwok-exit-delay``, e.g. ``"3s"``). Pods being deleted are removed immediately.

Use it as a context manager::

    with LocalCluster(nodes=2) as c:
        subprocess.run(["kubectl", "get", "nodes"], env=c.env(), check=True)

or ``python -m finetune_devcluster up`` for a long-lived one (``detach=True``; the processes outlive the
Python process and are found again with ``LocalCluster.attach(workdir)``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import tools
from . import kwok
from .components import (
    COMPONENTS,
    ETCD_DATA,
    KWOK_CONFIG,
    SCHEDULER_CONFIG,
    SERVICE_IP,
    client_kubeconfigs,
    control_plane_argv,
    kube_scheduler_config,
    kubeconfig_yaml,
)
from .kwok import DELAY_ANNOTATION, EXIT_ANNOTATION, FAKE_NODE_ANNOTATION, MESSAGE_ANNOTATION, REASON_ANNOTATION
from .pki import PKI
from .procutil import die_with_parent, free_port, pid_alive, tail

__all__ = [  # the annotations are kwok's, re-exported here for LocalCluster's users
    "ClusterError", "LocalCluster", "FAKE_NODE_ANNOTATION",
    "EXIT_ANNOTATION", "MESSAGE_ANNOTATION", "REASON_ANNOTATION", "DELAY_ANNOTATION",
]


class ClusterError(RuntimeError):
    """The control plane did not come up (the message carries each component's log tail)."""


@dataclass
class _Component:
    name: str
    argv: list[str]
    log: Path
    env: dict[str, str] | None = None
    proc: subprocess.Popen | None = None
    pid: int | None = None


class LocalCluster:
    """etcd + kube-apiserver + kube-controller-manager + kube-scheduler + kwok, plus fake GPU nodes.

    Args:
        nodes: fake nodes to register (named ``<node_prefix>-0`` ...).
        workdir: folder for certs, kubeconfigs, etcd data and logs; a fresh temp folder when None.
            Removed by ``stop()`` unless ``keep_workdir``.
        gpus_per_node, cpu, memory, pods: what each fake node advertises (capacity = allocatable).
        detach: processes are not tied to this Python process (for the CLI's ``up``).
        startup_timeout: seconds for everything to come up in ``start()``.
        extra_args: more flags per component (appended: a repeated flag overrides).
        apiserver_bind_address: where the API server listens: loopback, or ``0.0.0.0`` so that pods on a
            real node reach it through the `kubernetes` Service (see realnode.py).
    """

    def __init__(
        self,
        nodes: int = 2,
        workdir: str | Path | None = None,
        *,
        gpus_per_node: int = 8,
        cpu: str = "32",
        memory: str = "256Gi",
        pods: int = 110,
        node_prefix: str = "kwok-node",
        detach: bool = False,
        keep_workdir: bool = False,
        startup_timeout: float = 180.0,
        extra_args: dict[str, list[str]] | None = None,
        apiserver_bind_address: str = "127.0.0.1",
    ) -> None:
        self.nodes = nodes
        self.node_names = [f"{node_prefix}-{i}" for i in range(nodes)]
        self.node_resources = {"cpu": cpu, "memory": memory, "pods": str(pods), "nvidia.com/gpu": str(gpus_per_node)}
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="finetune-devcluster-")).resolve()
        self.detach = detach
        self.keep_workdir = keep_workdir
        self.startup_timeout = startup_timeout
        self.extra_args = extra_args or {}
        self.apiserver_bind_address = apiserver_bind_address
        self.ports: dict[str, int] = {}
        self.components: dict[str, _Component] = {}
        self._pki: PKI | None = None
        self._ssl: ssl.SSLContext | None = None
        self._started = False

    # ------------------------------------------------------------------------------------ paths
    @property
    def kubeconfig(self) -> Path:
        """Admin kubeconfig (client cert in group system:masters)."""
        return self.workdir / "kubeconfig"

    @property
    def state_file(self) -> Path:
        return self.workdir / "cluster.json"

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.ports['apiserver']}"

    @property
    def ca_file(self) -> Path:
        return self.workdir / "pki" / "ca.crt"

    @property
    def logs_dir(self) -> Path:
        return self.workdir / "logs"

    # ---------------------------------------------------------------------------- lifecycle
    def __enter__(self) -> "LocalCluster":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self, attempts: int = 3) -> "LocalCluster":
        """Start every component, register the nodes and wait until ready. Retries on a port clash."""
        bins = {n: tools.ensure(n) for n in ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")}
        last: Exception | None = None
        for attempt in range(attempts):
            try:
                self._start_once(bins)
                self._started = True
                return self
            except ClusterError as e:
                last = e
                self._kill_all()
                if "address already in use" not in str(e) or attempt == attempts - 1:
                    break
                shutil.rmtree(self.workdir / ETCD_DATA, ignore_errors=True)
        if not self.keep_workdir:
            self._remove_workdir()
        raise last  # type: ignore[misc]

    def _start_once(self, bins: dict[str, Path]) -> None:
        w = self.workdir
        w.mkdir(parents=True, exist_ok=True)
        self.logs_dir.mkdir(exist_ok=True)
        self.ports = {"etcd": free_port(), "etcd-peer": free_port(), "apiserver": free_port()}
        pki = self._pki = PKI(w / "pki", service_ip=SERVICE_IP)
        self._ssl = None
        self._write_config_files(pki)
        kwok_home = w / "kwok-home"  # kwok also loads ~/.kwok/kwok.yaml; keep a user's file out
        kwok_home.mkdir(exist_ok=True)
        envs = {"kwok": {**os.environ, "HOME": str(kwok_home)}}
        self.components = {
            n: _Component(n, argv + self.extra_args.get(n, []), self.logs_dir / f"{n}.log", envs.get(n))
            for n, argv in control_plane_argv(bins, w, self.ports, pki, self.apiserver_bind_address).items()
        }
        deadline = time.monotonic() + self.startup_timeout

        self._spawn("etcd")
        self._wait(lambda: self._http_ok(f"http://127.0.0.1:{self.ports['etcd']}/health"), deadline, "etcd /health")
        self._spawn("kube-apiserver")
        self._wait(lambda: self._get("/readyz")[0] == 200, deadline, "kube-apiserver /readyz")
        for n in ("kube-controller-manager", "kube-scheduler", "kwok"):
            self._spawn(n)
        self._write_state()
        self.create_nodes()
        self.wait_ready(timeout=max(5.0, deadline - time.monotonic()))
        self._write_state()

    def _write_config_files(self, pki: PKI) -> None:
        """The admin and per-component kubeconfigs, the scheduler's configuration and kwok's Stages."""
        w = self.workdir
        self.kubeconfig.write_text(kubeconfig_yaml(self.server, pki.ca.cert, pki.admin.cert, pki.admin.key, "admin"))
        pairs = {"controller-manager": pki.controller_manager, "scheduler": pki.scheduler, "kwok": pki.kwok}
        kubeconfigs = client_kubeconfigs(w)
        for who, pair in pairs.items():
            kubeconfigs[who].write_text(kubeconfig_yaml(self.server, pki.ca.cert, pair.cert, pair.key, who))
        (w / SCHEDULER_CONFIG).write_text(json.dumps(kube_scheduler_config(kubeconfigs["scheduler"])))
        (w / KWOK_CONFIG).write_text(kwok.stages())

    def _spawn(self, name: str) -> None:
        c = self.components[name]
        log = open(c.log, "ab")
        try:
            c.proc = subprocess.Popen(
                c.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.workdir,
                env=c.env,
                start_new_session=True,
                preexec_fn=None if self.detach else die_with_parent,
            )
        finally:
            log.close()
        c.pid = c.proc.pid

    def _write_state(self) -> None:
        state = {
            "workdir": str(self.workdir),
            "kubeconfig": str(self.kubeconfig),
            "server": self.server,
            "ports": self.ports,
            "nodes": self.node_names,
            "node_resources": self.node_resources,
            "pids": {n: c.pid for n, c in self.components.items() if c.pid},
            "argv": {n: c.argv for n, c in self.components.items()},
            "detached": self.detach,
            "apiserver_bind_address": self.apiserver_bind_address,
        }
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self.state_file)

    @classmethod
    def attach(cls, workdir: str | Path) -> "LocalCluster":
        """The cluster whose state is in ``workdir`` (started elsewhere, e.g. by ``up``)."""
        w = Path(workdir).resolve()
        state = json.loads((w / "cluster.json").read_text())
        self = cls(nodes=0, workdir=w, detach=True, keep_workdir=False)
        self.node_names = state["nodes"]
        self.nodes = len(self.node_names)
        self.node_resources = state.get("node_resources", self.node_resources)
        self.ports = state["ports"]
        self.apiserver_bind_address = state.get("apiserver_bind_address", "127.0.0.1")
        self._own_workdir = False
        for n, pid in state["pids"].items():
            self.components[n] = _Component(n, state["argv"].get(n, []), w / "logs" / f"{n}.log", pid=pid)
        self._started = True
        return self

    def running(self) -> dict[str, bool]:
        """Component name -> whether its process is alive."""
        out = {}
        for n, c in self.components.items():
            if c.proc is not None:
                out[n] = c.proc.poll() is None
            else:
                out[n] = bool(c.pid) and pid_alive(c.pid, str(self.workdir))
        return out

    def stop(self) -> None:
        """Kill every component (SIGTERM, then SIGKILL after 10 s) and remove the work folder."""
        self._kill_all()
        self._started = False
        if not self.keep_workdir:
            self._remove_workdir()

    def _remove_workdir(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)

    def _kill_all(self) -> None:
        # Everything but etcd first (in parallel), then etcd, so the API server does not spend its
        # shutdown retrying a vanished store.
        waves = [[n for n in reversed(COMPONENTS) if n in self.components and n != "etcd"]]
        if "etcd" in self.components:
            waves.append(["etcd"])
        for wave in waves:
            self._stop_wave(wave)

    def _stop_wave(self, order: list[str]) -> None:
        for n in order:
            self._signal(self.components[n], signal.SIGTERM)
        deadline = time.monotonic() + 10
        for n in order:
            c = self.components[n]
            while self.running().get(n) and time.monotonic() < deadline:
                time.sleep(0.1)
            if self.running().get(n):
                self._signal(c, signal.SIGKILL)
            if c.proc is not None:
                try:
                    c.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass

    def _signal(self, c: _Component, sig: int) -> None:
        if c.proc is not None:
            if c.proc.poll() is None:
                try:
                    c.proc.send_signal(sig)
                except ProcessLookupError:
                    pass
        elif c.pid and pid_alive(c.pid, str(self.workdir)):
            try:
                os.kill(c.pid, sig)
            except ProcessLookupError:
                pass

    # ------------------------------------------------------------------------------- waiting
    def _diagnostics(self, lines: int = 50) -> str:
        parts = []
        for n, c in self.components.items():
            state = "running" if self.running().get(n) else (
                f"exited rc={c.proc.returncode}" if c.proc is not None and c.proc.poll() is not None else "not running"
            )
            parts.append(f"----- {n} ({state}); last {lines} lines of {c.log} -----\n{tail(c.log, lines)}")
        return "\n".join(parts)

    def _wait(self, check, deadline: float, what: str, interval: float = 0.25) -> None:
        err: Exception | None = None
        while True:
            dead = [n for n, c in self.components.items() if c.proc is not None and c.proc.poll() is not None]
            if dead:
                raise ClusterError(f"{', '.join(dead)} exited while waiting for {what}\n{self._diagnostics()}")
            try:
                if check():
                    return
                err = None
            except Exception as e:  # noqa: BLE001 - reported if it never succeeds
                err = e
            if time.monotonic() > deadline:
                raise ClusterError(f"timed out waiting for {what} (last error: {err!r})\n{self._diagnostics()}")
            time.sleep(interval)

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Block until /readyz is ok, every fake node is Ready without taints, and ``default/default``
        ServiceAccount exists (pods can be created)."""
        deadline = time.monotonic() + timeout
        self._wait(lambda: self._get("/readyz")[0] == 200, deadline, "kube-apiserver /readyz")
        self._wait(self._nodes_ready, deadline, f"nodes {self.node_names} Ready and untainted")
        self._wait(
            lambda: self._get("/api/v1/namespaces/default/serviceaccounts/default")[0] == 200,
            deadline,
            "ServiceAccount default/default",
        )

    def _nodes_ready(self) -> bool:
        for name in self.node_names:
            code, node = self._get(f"/api/v1/nodes/{name}")
            if code != 200:
                return False
            conds = {c["type"]: c["status"] for c in node.get("status", {}).get("conditions", [])}
            if conds.get("Ready") != "True" or node.get("spec", {}).get("taints"):
                return False
        return True

    # ----------------------------------------------------------------------------- REST client
    def _context(self) -> ssl.SSLContext:
        if self._ssl is None:
            pki = self.workdir / "pki"
            ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
            ctx.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
            self._ssl = ctx
        return self._ssl

    @staticmethod
    def _http_ok(url: str) -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def request(
        self, method: str, path: str, body: Any = None, content_type: str = "application/json", timeout: float = 10
    ) -> tuple[int, Any]:
        """A raw API call as the admin user: ``(status, parsed JSON or text)``. No exception on 4xx/5xx."""
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        req = urllib.request.Request(self.server + path, data=data, method=method)
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, context=self._context(), timeout=timeout) as r:
                code, raw = r.status, r.read()
        except urllib.error.HTTPError as e:
            code, raw = e.code, e.read()
        try:
            return code, json.loads(raw) if raw else None
        except ValueError:
            return code, raw.decode(errors="replace")

    def _get(self, path: str) -> tuple[int, Any]:
        return self.request("GET", path, timeout=5)

    def _ok(self, method: str, path: str, body: Any = None, content_type: str = "application/json") -> Any:
        code, out = self.request(method, path, body, content_type)
        if code >= 300:
            raise ClusterError(f"{method} {path} -> HTTP {code}: {out}")
        return out

    # --------------------------------------------------------------------------------- nodes
    def node_manifest(self, name: str) -> dict[str, Any]:
        return kwok.fake_node(name, self.node_resources, tools.K8S_VERSION)

    def create_nodes(self) -> None:
        for name in self.node_names:
            code, out = self.request("POST", "/api/v1/nodes", self.node_manifest(name))
            if code not in (201, 409):
                raise ClusterError(f"creating node {name}: HTTP {code}: {out}\n{self._diagnostics()}")

    # ------------------------------------------------------------------------------ clients
    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """Environment for subprocesses (kubectl, helm, the operator): ``base`` (default os.environ) with
        KUBECONFIG pointing at this cluster and the built kubectl/helm first on PATH when available."""
        env = dict(os.environ if base is None else base)
        env["KUBECONFIG"] = str(self.kubeconfig)
        dirs = [str(p.parent) for p in (tools.find("kubectl"), tools.find("helm")) if p]
        if dirs:
            env["PATH"] = os.pathsep.join([*dict.fromkeys(dirs), env.get("PATH", "")])
        return env

    def api_client(self):
        """A ``kubernetes.client.ApiClient`` authenticated as the admin."""
        from kubernetes import client

        pki = self.workdir / "pki"
        cfg = client.Configuration()
        cfg.host = self.server
        cfg.ssl_ca_cert = str(pki / "ca.crt")
        cfg.cert_file = str(pki / "admin.crt")
        cfg.key_file = str(pki / "admin.key")
        cfg.verify_ssl = True
        return client.ApiClient(cfg)

    def kubectl(self, *args: str, check: bool = True, input: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run kubectl against this cluster; returns the CompletedProcess (text mode)."""
        exe = shutil.which("kubectl") if os.environ.get("FINETUNE_SYSTEM_KUBECTL") else None
        exe = exe or str(tools.ensure("kubectl"))
        proc = subprocess.run(
            [exe, f"--kubeconfig={self.kubeconfig}", *args],
            input=input, capture_output=True, text=True, timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise ClusterError(f"kubectl {' '.join(args)} failed ({proc.returncode}): {proc.stderr}{proc.stdout}")
        return proc

    def logs(self, component: str, lines: int = 50) -> str:
        return tail(self.logs_dir / f"{component}.log", lines)

    # ------------------------------------------------------------------------- pod endings
    def pod_exit(
        self,
        namespace: str,
        name: str,
        exit_code: int,
        message: str = "",
        reason: str | None = None,
        delay: str | None = None,
        wait: bool = True,
        timeout: float = 30.0,
    ) -> dict[str, Any]:
        """Make a pod on a fake node terminate: every container exits with ``exit_code`` (phase Succeeded for
        0, Failed otherwise), with ``message`` and ``reason`` in its terminated state. The pod must be on a
        kwok node; if it is still Pending it ends as soon as kwok makes it Running. Returns the pod (JSON)
        once its phase changed when ``wait``."""
        ann = kwok.exit_annotations(exit_code, message, reason, delay)
        path = f"/api/v1/namespaces/{namespace}/pods/{name}"
        self._ok("PATCH", path, {"metadata": {"annotations": ann}}, "application/merge-patch+json")
        want = "Succeeded" if exit_code == 0 else "Failed"
        if not wait:
            return self._ok("GET", path)
        deadline = time.monotonic() + timeout
        pod: Any = None
        while time.monotonic() < deadline:
            code, pod = self._get(path)
            if code == 200 and pod.get("status", {}).get("phase") == want:
                return pod
            time.sleep(0.2)
        raise ClusterError(
            f"pod {namespace}/{name} did not reach {want} within {timeout}s; "
            f"status={json.dumps((pod or {}).get('status'))}\nkwok log:\n{self.logs('kwok', 30)}"
        )

    def pod_succeed(self, namespace: str, name: str, message: str = "", **kw: Any) -> dict[str, Any]:
        """Pod -> Succeeded, containers terminated with exit code 0 (reason Completed)."""
        return self.pod_exit(namespace, name, 0, message, **kw)

    def pod_fail(self, namespace: str, name: str, exit_code: int = 1, message: str = "", **kw: Any) -> dict[str, Any]:
        """Pod -> Failed, containers terminated with ``exit_code`` (non-zero; reason Error) and ``message``."""
        if exit_code == 0:
            raise ValueError("pod_fail needs a non-zero exit_code; use pod_succeed")
        return self.pod_exit(namespace, name, exit_code, message, **kw)
