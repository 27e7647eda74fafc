"""A node whose pods really run, as local processes: a minimal kubelet for the local control plane.

kwok only simulates pods. ``ProcessNode`` registers a Node, keeps it Ready (Lease + status), and
runs every pod the scheduler binds to it as a process tree on this machine, so the operator's real
pod spec is what executes:

* the container's ``command``/``args`` with ``$(VAR)`` expansion, its ``env`` (literal values,
  ``fieldRef`` on metadata/annotations/labels, ``secretKeyRef`` and ``configMapKeyRef`` read from the API);
* its volumes: ``configMap`` and ``secret`` materialised as files, ``emptyDir`` as folders; a path in
  an argument or env value under a mount path is rewritten to the host folder backing it, and so is
  the termination-message path;
* the image is ignored: the process runs in this machine's environment (the project's venv first on PATH).

What a node on one machine must do differently, and does:
* cluster DNS: a ``*.svc`` / ``*.svc.cluster.local`` host in an argument resolves to 127.0.0.1;
* ports: each pod group gets its own torchrun rendezvous port (``--master-port`` is rewritten per
  group) and each pod its own block of metrics ports (env ``FINETUNE_METRICS_PORT`` is the block's
  first port; local rank i of the pod's ``--nproc-per-node`` processes serves on it + i), published
  on the pod as annotation ``finetune.io/metrics-port`` (the base) and, one target per local rank,
  in the Prometheus file_sd targets file; the pod IP is 127.0.0.1.

Status goes back to the API server like a kubelet's: Pending -> Running (conditions, containerStatuses,
startTime, podIP) -> Succeeded/Failed with exit code, reason and termination message (falling back to
the log tail for ``FallbackToLogsOnError``). Deleting a pod sends SIGTERM to its process group, waits
for the grace period, then SIGKILL, then removes the pod, as the kubelet does.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .kwok import FAKE_EPHEMERAL_STORAGE
from .procutil import free_port, free_port_block

log = logging.getLogger("finetune_devcluster.procnode")

NODE_LABEL = "finetune.io/node-type"
METRICS_PORT_ANNOTATION = "finetune.io/metrics-port"
TAINT_KEY = "finetune.io/process-node"
_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_.\-]*)\)")
_SVC_HOST = re.compile(r"\b[a-z0-9]([-a-z0-9.]*[a-z0-9])?\.svc(\.cluster\.local)?\b")
_NPROC = re.compile(r"--nproc[-_]per[-_]node(?:=(.*))?")


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def local_processes(argv: list[str]) -> int:
    """How many processes a pod's command runs on this node: torchrun's ``--nproc-per-node``
    (``=N`` or ``N`` as the next argument, either spelling), else 1 (also for ``gpu``/``auto``)."""
    for i, arg in enumerate(argv):
        m = _NPROC.fullmatch(arg)
        if not m:
            continue
        value = m.group(1) if m.group(1) is not None else (argv[i + 1] if i + 1 < len(argv) else "")
        return int(value) if value.isdigit() and int(value) > 0 else 1
    return 1


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes $(VAR) expansion: known variables are replaced, $$ escapes, unknown ones stay."""
    out, i = [], 0
    while i < len(value):
        if value.startswith("$$", i):
            out.append("$")
            i += 2
            continue
        m = _VAR.match(value, i)
        if m and m.group(1) in env:
            out.append(env[m.group(1)])
            i = m.end()
            continue
        out.append(value[i])
        i += 1
    return "".join(out)


def _field_ref(pod: dict[str, Any], path: str) -> str:
    meta = pod["metadata"]
    m = re.fullmatch(r"metadata\.(annotations|labels)\['(.+)'\]", path)
    if m:
        return (meta.get(m.group(1)) or {}).get(m.group(2), "")
    simple = {
        "metadata.name": meta.get("name", ""),
        "metadata.namespace": meta.get("namespace", ""),
        "metadata.uid": meta.get("uid", ""),
        "spec.nodeName": pod["spec"].get("nodeName", ""),
        "spec.serviceAccountName": pod["spec"].get("serviceAccountName", ""),
        "status.podIP": "127.0.0.1",
        "status.hostIP": "127.0.0.1",
    }
    return simple.get(path, "")


@dataclass
class _Running:
    pod: dict[str, Any]
    proc: subprocess.Popen
    sandbox: Path
    termination_file: Path
    log_file: Path
    started: str
    deleting: bool = False
    done: threading.Event = field(default_factory=threading.Event)


class ProcessNode:
    """Run the pods bound to one Node as local processes.

    Args:
        api: a ``kubernetes.client.ApiClient`` with rights to manage nodes, leases and pods.
        name: the Node's name.
        workdir: where each pod's sandbox (volumes, termination file, log) is created.
        cpu/memory/gpus/pods: what the node advertises to the scheduler.
        path_prepend: folders put first on PATH for the processes (e.g. the venv's bin).
    """

    def __init__(self, api, name: str = "process-node-0", workdir: str | Path | None = None, *, cpu: str = "16",
                 memory: str = "64Gi", gpus: int = 0, pods: int = 50, path_prepend: list[str] | None = None,
                 extra_env: dict[str, str] | None = None, taint: bool = False, targets_file: str | Path | None = None):
        from kubernetes import client

        self.api = api
        self.core = client.CoreV1Api(api)
        self.coord = client.CoordinationV1Api(api)
        self.name = name
        self.workdir = Path(workdir or f"/tmp/finetune-procnode-{name}").resolve()
        self.capacity = {"cpu": cpu, "memory": memory, "pods": str(pods), "nvidia.com/gpu": str(gpus),
                         "ephemeral-storage": FAKE_EPHEMERAL_STORAGE}
        self.path_prepend = path_prepend if path_prepend is not None else [str(Path(sys.executable).parent)]
        self.extra_env = extra_env or {}
        # With a taint only pods that tolerate it land here (a cluster that also has kwok nodes).
        self.taints = [{"key": TAINT_KEY, "value": "true", "effect": "NoSchedule"}] if taint else []
        # Prometheus file_sd: one target group per running pod that exposes metrics, a target per
        # local rank (kept current here).
        self.targets_file = Path(targets_file) if targets_file else None
        self._metrics: dict[str, dict[str, Any]] = {}
        self._running: dict[str, _Running] = {}
        self._group_ports: dict[str, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------------------------- node
    def _node_manifest(self) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": self.name,
                "labels": {
                    NODE_LABEL: "process",
                    "kubernetes.io/hostname": self.name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                },
            },
            "spec": {"taints": self.taints} if self.taints else {},
        }

    def _node_status(self) -> dict[str, Any]:
        t = now()
        return {
            "status": {
                "capacity": self.capacity,
                "allocatable": self.capacity,
                "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": self.name}],
                "conditions": [
                    {"type": "Ready", "status": "True", "reason": "ProcessNodeReady", "message": "runs pods as local processes",
                     "lastHeartbeatTime": t, "lastTransitionTime": t},
                    {"type": "MemoryPressure", "status": "False", "reason": "ProcessNode", "lastHeartbeatTime": t, "lastTransitionTime": t},
                    {"type": "DiskPressure", "status": "False", "reason": "ProcessNode", "lastHeartbeatTime": t, "lastTransitionTime": t},
                    {"type": "PIDPressure", "status": "False", "reason": "ProcessNode", "lastHeartbeatTime": t, "lastTransitionTime": t},
                ],
                "nodeInfo": {"architecture": "amd64", "operatingSystem": "linux", "kubeletVersion": "v1.33.13-process",
                              "containerRuntimeVersion": "process://local", "kernelVersion": os.uname().release,
                              "osImage": "local", "kubeProxyVersion": "", "machineID": "", "systemUUID": "", "bootID": ""},
            }
        }

    def register(self) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            self.core.create_node(self._node_manifest())
        except ApiException as exc:
            if exc.status != 409:
                raise
        self.core.patch_node_status(self.name, self._node_status())
        # remove the not-ready taint the node lifecycle controller may have added before our first heartbeat
        node = self.core.read_node(self.name)
        taints = [t for t in (node.spec.taints or []) if not t.key.startswith("node.kubernetes.io/")]
        if len(taints) != len(node.spec.taints or []):
            self.core.patch_node(self.name, {"spec": {"taints": [self.api.sanitize_for_serialization(t) for t in taints] or None}})

    def _heartbeat(self) -> None:
        while not self._stop.wait(10):
            try:
                self.core.patch_node_status(self.name, self._node_status())
                self._renew_lease()
            except Exception as exc:  # keep beating through API blips
                log.warning("heartbeat failed: %s", exc)

    def _renew_lease(self) -> None:
        from kubernetes.client.exceptions import ApiException

        renew = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        spec = {"holderIdentity": self.name, "leaseDurationSeconds": 40, "renewTime": renew}
        try:
            self.coord.patch_namespaced_lease(self.name, "kube-node-lease", {"spec": spec})
        except ApiException as exc:
            if exc.status != 404:
                raise
            self.coord.create_namespaced_lease("kube-node-lease", {
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": self.name, "namespace": "kube-node-lease"}, "spec": spec})

    # ------------------------------------------------------------------------------- pods
    def start(self) -> "ProcessNode":
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.register()
        self._renew_lease()
        for target in (self._heartbeat, self._watch_pods):
            t = threading.Thread(target=target, name=f"procnode-{target.__name__}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def pid_of(self, namespace: str, pod: str) -> int | None:
        """The pid of the process running a pod (its process group leader), or None."""
        with self._lock:
            for run in self._running.values():
                meta = run.pod["metadata"]
                if (meta["namespace"], meta["name"]) == (namespace, pod) and run.proc.poll() is None:
                    return run.proc.pid
        return None

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            running = list(self._running.values())
        for r in running:
            self._terminate(r, grace=5)

    def _watch_pods(self) -> None:
        from kubernetes import watch

        while not self._stop.is_set():
            try:
                w = watch.Watch()
                for ev in w.stream(self.core.list_pod_for_all_namespaces, field_selector=f"spec.nodeName={self.name}", timeout_seconds=60):
                    if self._stop.is_set():
                        w.stop()
                        return
                    pod = self.api.sanitize_for_serialization(ev["object"])
                    self._on_pod(ev["type"], pod)
            except Exception as exc:
                log.warning("pod watch restarted: %s", exc)
                time.sleep(1)

    def _on_pod(self, kind: str, pod: dict[str, Any]) -> None:
        uid = pod["metadata"]["uid"]
        with self._lock:
            running = self._running.get(uid)
        if kind == "DELETED":
            if running:
                self._terminate(running, grace=0)
            return
        if pod["metadata"].get("deletionTimestamp"):
            if running and not running.deleting:
                running.deleting = True
                grace = int(pod["metadata"].get("deletionGracePeriodSeconds") or 30)
                threading.Thread(target=self._delete_after_stop, args=(running, grace), daemon=True).start()
            elif not running:
                self._force_delete(pod)
            return
        phase = (pod.get("status") or {}).get("phase") or "Pending"
        if running is None and phase == "Pending" and not (pod.get("status") or {}).get("startTime"):
            try:
                self._launch(pod)
            except Exception as exc:
                log.exception("could not start pod %s/%s", pod["metadata"]["namespace"], pod["metadata"]["name"])
                self._report_failed_to_start(pod, str(exc))

    def _group_port(self, key: str) -> int:
        with self._lock:
            if key not in self._group_ports:
                self._group_ports[key] = free_port()
            return self._group_ports[key]

    def _resolve_env(self, pod: dict[str, Any], container: dict[str, Any]) -> dict[str, str]:
        from kubernetes.client.exceptions import ApiException
        import base64

        ns = pod["metadata"]["namespace"]
        env: dict[str, str] = {}
        for src in container.get("envFrom") or []:
            if "secretRef" in src:
                data = self.core.read_namespaced_secret(src["secretRef"]["name"], ns).data or {}
                env.update({k: base64.b64decode(v).decode() for k, v in data.items()})
            elif "configMapRef" in src:
                env.update(self.core.read_namespaced_config_map(src["configMapRef"]["name"], ns).data or {})
        for item in container.get("env") or []:
            name = item["name"]
            if "value" in item:
                env[name] = expand(item.get("value") or "", env)
                continue
            ref = item.get("valueFrom") or {}
            try:
                if "fieldRef" in ref:
                    env[name] = _field_ref(pod, ref["fieldRef"]["fieldPath"])
                elif "secretKeyRef" in ref:
                    r = ref["secretKeyRef"]
                    data = self.core.read_namespaced_secret(r["name"], ns).data or {}
                    if r["key"] in data:
                        env[name] = base64.b64decode(data[r["key"]]).decode()
                    elif not r.get("optional"):
                        raise RuntimeError(f"secret {r['name']} has no key {r['key']}")
                elif "configMapKeyRef" in ref:
                    r = ref["configMapKeyRef"]
                    data = self.core.read_namespaced_config_map(r["name"], ns).data or {}
                    if r["key"] in data:
                        env[name] = data[r["key"]]
                    elif not r.get("optional"):
                        raise RuntimeError(f"configmap {r['name']} has no key {r['key']}")
            except ApiException as exc:
                if exc.status == 404 and (ref.get("secretKeyRef") or ref.get("configMapKeyRef") or {}).get("optional"):
                    continue
                raise RuntimeError(f"CreateContainerConfigError: {exc.reason} reading env {name}") from exc
        return env

    def _materialise_volumes(self, pod: dict[str, Any], sandbox: Path) -> dict[str, Path]:
        import base64

        ns = pod["metadata"]["namespace"]
        hosts: dict[str, Path] = {}
        for vol in pod["spec"].get("volumes") or []:
            host = sandbox / "volumes" / vol["name"]
            host.mkdir(parents=True, exist_ok=True)
            if "configMap" in vol:
                cm = self.core.read_namespaced_config_map(vol["configMap"]["name"], ns)
                for k, v in (cm.data or {}).items():
                    (host / k).write_text(v)
            elif "secret" in vol:
                sec = self.core.read_namespaced_secret(vol["secret"]["secretName"], ns)
                for k, v in (sec.data or {}).items():
                    (host / k).write_bytes(base64.b64decode(v))
                    os.chmod(host / k, 0o600)
            hosts[vol["name"]] = host
        return hosts

    def _launch(self, pod: dict[str, Any]) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        ns, name, uid = meta["namespace"], meta["name"], meta["uid"]
        container = spec["containers"][0]
        sandbox = self.workdir / f"{ns}_{name}_{uid[:8]}"
        shutil.rmtree(sandbox, ignore_errors=True)
        sandbox.mkdir(parents=True)
        volumes = self._materialise_volumes(pod, sandbox)
        mounts = {m["mountPath"]: volumes[m["name"]] for m in container.get("volumeMounts") or [] if m["name"] in volumes}
        termination_path = container.get("terminationMessagePath") or "/dev/termination-log"
        termination_file = sandbox / "termination-log"
        termination_file.touch()
        mounts[termination_path] = termination_file

        # One pass, longest mount first, at path boundaries only: a host path that itself contains a
        # mount path (a sandbox under /tmp, say) must not be rewritten again.
        pattern = re.compile(r"(?<![\w.\-/])(" + "|".join(re.escape(m) for m in sorted(mounts, key=len, reverse=True)) + r")(?=/|$|[^\w.\-])")

        def rewrite(value: str) -> str:
            value = pattern.sub(lambda m: str(mounts[m.group(1)]), value)
            return _SVC_HOST.sub("127.0.0.1", value)

        env = self._resolve_env(pod, container)
        group = f"{ns}/{spec.get('subdomain') or name}/{(meta.get('labels') or {}).get('finetune.io/attempt', '')}"
        env = {k: rewrite(v) for k, v in env.items()}
        command = (container.get("command") or []) + (container.get("args") or [])
        # Local rank i serves metrics on FINETUNE_METRICS_PORT + i: give the pod as many consecutive
        # ports as it runs processes (set before expanding the command, which may use the variable).
        procs = local_processes([expand(a, env) for a in command])
        metrics_port = free_port_block(procs)
        if "FINETUNE_METRICS_PORT" in env:
            env["FINETUNE_METRICS_PORT"] = str(metrics_port)
        argv = [expand(a, env) for a in command]
        argv = [rewrite(a) for a in argv]
        argv = [f"--master-port={self._group_port(group)}" if a.startswith("--master-port=") else a for a in argv]
        if not argv:
            raise RuntimeError("the container has no command: a process node cannot run an image's entrypoint")
        proc_env = {
            "PATH": os.pathsep.join([*self.path_prepend, os.environ.get("PATH", "/usr/bin:/bin")]),
            "HOSTNAME": spec.get("hostname") or name,
            "LANG": "C.UTF-8",
            **self.extra_env,
            **env,
        }
        log_file = sandbox / "container.log"
        with open(log_file, "ab") as out:
            proc = subprocess.Popen(argv, env=proc_env, cwd=sandbox, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        started = now()
        run = _Running(pod=pod, proc=proc, sandbox=sandbox, termination_file=termination_file, log_file=log_file, started=started)
        with self._lock:
            self._running[uid] = run
        log.info("started %s/%s: %s (pid %d)", ns, name, " ".join(argv), proc.pid)
        self.core.patch_namespaced_pod(name, ns, {"metadata": {"annotations": {METRICS_PORT_ANNOTATION: str(metrics_port)}}})
        if "FINETUNE_METRICS_PORT" in env:
            self._publish(uid, {"targets": [f"127.0.0.1:{metrics_port + i}" for i in range(procs)], "labels": {"namespace": ns, "pod": name}})
        self._patch_status(pod, {
            "phase": "Running",
            "startTime": started,
            "podIP": "127.0.0.1",
            "podIPs": [{"ip": "127.0.0.1"}],
            "hostIP": "127.0.0.1",
            "conditions": self._conditions(ready=True),
            "containerStatuses": [self._container_status(container, {"running": {"startedAt": started}}, ready=True)],
        })
        threading.Thread(target=self._wait, args=(uid, container), daemon=True, name=f"pod-{name}").start()

    @staticmethod
    def _conditions(ready: bool) -> list[dict[str, Any]]:
        t = now()
        flag = "True" if ready else "False"
        return [
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": t},
            {"type": "Initialized", "status": "True", "lastTransitionTime": t},
            {"type": "ContainersReady", "status": flag, "lastTransitionTime": t},
            {"type": "Ready", "status": flag, "lastTransitionTime": t},
        ]

    @staticmethod
    def _container_status(container: dict[str, Any], state: dict[str, Any], ready: bool) -> dict[str, Any]:
        return {"name": container["name"], "image": container.get("image", ""), "imageID": "", "ready": ready,
                "started": "running" in state, "restartCount": 0, "state": state}

    def _patch_status(self, pod: dict[str, Any], status: dict[str, Any]) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            self.core.patch_namespaced_pod_status(pod["metadata"]["name"], pod["metadata"]["namespace"], {"status": status})
        except ApiException as exc:
            if exc.status != 404:
                raise

    def _wait(self, uid: str, container: dict[str, Any]) -> None:
        with self._lock:
            run = self._running[uid]
        code = run.proc.wait()
        message = run.termination_file.read_text(errors="replace").strip()[-4096:]
        if not message and code != 0 and container.get("terminationMessagePolicy") == "FallbackToLogsOnError":
            lines = run.log_file.read_text(errors="replace").splitlines()[-80:]
            message = "\n".join(lines)[-2048:]
        if code < 0:  # killed by a signal: report as a container runtime does
            code = 128 - code
        finished = now()
        terminated = {"exitCode": code, "reason": "Completed" if code == 0 else "Error", "startedAt": run.started, "finishedAt": finished}
        if message:
            terminated["message"] = message
        log.info("%s/%s exited with %d", run.pod["metadata"]["namespace"], run.pod["metadata"]["name"], code)
        if not run.deleting:
            self._patch_status(run.pod, {
                "phase": "Succeeded" if code == 0 else "Failed",
                "conditions": self._conditions(ready=False),
                "containerStatuses": [self._container_status(container, {"terminated": terminated}, ready=False)],
            })
        run.done.set()
        with self._lock:
            self._running.pop(uid, None)
        self._publish(uid, None)

    def _publish(self, uid: str, target: dict[str, Any] | None) -> None:
        if self.targets_file is None:
            return
        import json

        with self._lock:
            if target is None:
                self._metrics.pop(uid, None)
            else:
                self._metrics[uid] = target
            tmp = self.targets_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(list(self._metrics.values())))
            tmp.replace(self.targets_file)  # atomic: Prometheus never reads half a file

    def _terminate(self, run: _Running, grace: float) -> None:
        if run.proc.poll() is None:
            try:
                os.killpg(run.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                run.proc.wait(timeout=max(grace, 0.1))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(run.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                run.proc.wait()

    def _delete_after_stop(self, run: _Running, grace: int) -> None:
        self._terminate(run, grace)
        run.done.wait(timeout=10)
        self._force_delete(run.pod)

    def _force_delete(self, pod: dict[str, Any]) -> None:
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        try:
            self.core.delete_namespaced_pod(pod["metadata"]["name"], pod["metadata"]["namespace"],
                                            body=client.V1DeleteOptions(grace_period_seconds=0))
        except ApiException as exc:
            if exc.status != 404:
                raise

    def _report_failed_to_start(self, pod: dict[str, Any], message: str) -> None:
        container = pod["spec"]["containers"][0]
        t = now()
        self._patch_status(pod, {
            "phase": "Failed",
            "conditions": self._conditions(ready=False),
            "containerStatuses": [self._container_status(container, {"terminated": {
                "exitCode": 128, "reason": "StartError", "message": message[-2048:], "startedAt": t, "finishedAt": t}}, ready=False)],
        })
