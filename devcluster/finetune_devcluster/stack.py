"""The rest of the local stack on top of the control plane and S3: the operator installed with its
Helm chart, the node the training pods run on, demo data in S3, and the demo itself.

Two kinds of node (``demo --node``):

* ``real`` (the default): a kubelet + containerd node (realnode.py, run in the background by
  ``python -m finetune_devcluster realnode``). The chart is installed as in any cluster: its Deployment
  runs the operator image built here, in-cluster, with its own ServiceAccount token, RBAC, probes and
  securityContext; the training pods are containers from the trainer image built here. MinIO and MLflow
  listen on the node's address (the pods' gateway), so ``examples/`` are applied with their
  ``http://127.0.0.1`` endpoints pointed there (``for_node``).
* ``process``: the process node (procnode.py) runs a pod's command as a local process and ignores its
  image, for machines without root or containerd. The chart is installed (CRD, ServiceAccount, RBAC,
  Service) with ``replicaCount=0``, and the operator runs as a local process authenticated with the
  chart's own ServiceAccount token — the rights it has in a real cluster.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from . import tools
from .cluster import LocalCluster
from .procutil import free_port, pid_alive, port_free

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "finetune-operator"
EXAMPLES = REPO / "examples"
RELEASE, OPERATOR_NS = "finetune-operator", "finetune-system"
DEMO_BUCKET = "finetune-demo"
DEMO_S3_PORT = 9000
SECRET = "s3-credentials"


# ---------------------------------------------------------------------------- background processes


def _pidfile(state: Path, name: str) -> Path:
    return state / f"{name}.pid"


def _marker(name: str) -> str:
    return "prometheus" if name == "prometheus" else "python"


def running(state: Path, name: str) -> int | None:
    try:
        pid = int(_pidfile(state, name).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pid if pid_alive(pid, _marker(name)) else None


def spawn(state: Path, name: str, argv: list[str], env: dict[str, str]) -> int:
    """Start a detached background process (it outlives this CLI); its pid goes to <state>/<name>.pid."""
    state.mkdir(parents=True, exist_ok=True)
    log = open(state / f"{name}.log", "ab")
    proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, cwd=REPO)
    _pidfile(state, name).write_text(f"{proc.pid}\n")
    return proc.pid


def stop(state: Path, name: str, timeout: float = 30) -> bool:
    pid = running(state, name)
    _pidfile(state, name).unlink(missing_ok=True)
    if pid is None:
        return False
    try:
        os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and pid_alive(pid, _marker(name)):
            time.sleep(0.2)
        if pid_alive(pid, _marker(name)):
            os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return True


# ------------------------------------------------------------------------------------- operator


def helm(cluster: LocalCluster, *args: str) -> str:
    proc = subprocess.run([str(tools.ensure("helm")), *args], env=cluster.env(), capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"helm {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout


def install_chart(cluster: LocalCluster) -> None:
    """helm upgrade --install: re-running is safe."""
    helm(cluster, "upgrade", "--install", RELEASE, str(CHART), "-n", OPERATOR_NS, "--create-namespace",
         "--set", "replicaCount=0", "--wait", "--timeout", "120s")


def in_cluster_chart_args(operator_ref: str, trainer_ref: str, endpoints: list[str]) -> list[str]:
    """``helm upgrade --install`` arguments of the real-node demo: the chart's Deployment runs the operator
    image built here, its training pods the trainer image built here (both imported into the node's
    containerd: pull policy ``Never``, nothing can be pulled), in the chart's secure mode: jobs may name
    only the demo's own ``endpoints`` (its S3 and MLflow), and the operator reads only credential Secrets
    labelled for it."""
    from finetune_api.failures import CREDENTIALS_SECRET_LABEL

    op_repo, op_tag = operator_ref.rsplit(":", 1)
    tr_repo, tr_tag = trainer_ref.rsplit(":", 1)
    key, value = CREDENTIALS_SECRET_LABEL
    return ["upgrade", "--install", RELEASE, str(CHART), "-n", OPERATOR_NS, "--create-namespace",
            "--set", "replicaCount=1",
            "--set", f"image.repository={op_repo}", "--set", f"image.tag={op_tag}", "--set", "image.pullPolicy=Never",
            "--set", f"trainer.image.repository={tr_repo}", "--set", f"trainer.image.tag={tr_tag}",
            "--set", "trainer.image.pullPolicy=Never",
            "--set", "resyncSeconds=5",
            "--set-json", f"storage.allowedEndpoints={json.dumps(endpoints)}",
            "--set-json", f"storage.credentialsSecretLabels={json.dumps({key: value})}",
            "--set-json", 'extraEnv=[{"name": "FINETUNE_PROGRESS_INTERVAL", "value": "5"}]',
            "--wait", "--timeout", "180s"]


def install_chart_in_cluster(cluster: LocalCluster, operator_ref: str, trainer_ref: str, endpoints: list[str]) -> dict[str, Any]:
    """The chart with its Deployment running (``--wait``: the operator pod Ready, its readiness probe
    answered through the kubelet); returns the operator pod."""
    helm(cluster, *in_cluster_chart_args(operator_ref, trainer_ref, endpoints))
    pods = json.loads(cluster.kubectl("get", "pods", "-n", OPERATOR_NS, "-l", f"app.kubernetes.io/instance={RELEASE}",
                                      "-o", "json").stdout)["items"]
    ready = [p for p in pods if any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))]
    if not ready:
        raise RuntimeError(f"helm reported the release ready but no operator pod is Ready: {[p['status'] for p in pods]}")
    return ready[0]


# The addresses examples/ name (the process node's pods share the machine's loopback).
EXAMPLE_HOST = "127.0.0.1"


def for_node(manifest: str, host: str) -> str:
    """An example manifest with its S3 and MLflow endpoints (``http://127.0.0.1:<port>``) pointed at
    ``host``, where a real node's pods reach the demo's MinIO and MLflow (the node's address)."""
    return manifest.replace(f"http://{EXAMPLE_HOST}:", f"http://{host}:")


def token_kubeconfig(cluster: LocalCluster, service_account: str, namespace: str, path: Path, duration: str = "720h") -> Path:
    """A kubeconfig that authenticates as a ServiceAccount (a token from the TokenRequest API)."""
    token = cluster.kubectl("create", "token", service_account, "-n", namespace, f"--duration={duration}").stdout.strip()
    path.write_text(
        "apiVersion: v1\nkind: Config\n"
        f"clusters: [{{name: local, cluster: {{server: '{cluster.server}', certificate-authority: '{cluster.ca_file}'}}}}]\n"
        f"users: [{{name: {service_account}, user: {{token: '{token}'}}}}]\n"
        f"contexts: [{{name: sa, context: {{cluster: local, user: {service_account}}}}}]\ncurrent-context: sa\n"
    )
    path.chmod(0o600)
    return path


def service_account_kubeconfig(cluster: LocalCluster, path: Path) -> Path:
    """Credentials of the ServiceAccount the chart made for the operator."""
    sa = json.loads(cluster.kubectl("get", "deployment", "-n", OPERATOR_NS, "-l", f"app.kubernetes.io/instance={RELEASE}",
                                    "-o", "json").stdout)["items"][0]["spec"]["template"]["spec"]["serviceAccountName"]
    return token_kubeconfig(cluster, sa, OPERATOR_NS, path)


def start_operator(cluster: LocalCluster, state: Path, *, metrics_port: int = 8080) -> int:
    pid = running(state, "operator")
    if pid:
        return pid
    install_chart(cluster)
    kubeconfig = service_account_kubeconfig(cluster, state / "operator.kubeconfig")
    port = metrics_port if port_free(metrics_port) else free_port()
    (state / "operator.port").write_text(f"{port}\n")
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "FINETUNE_METRICS_PORT": str(port),
           "FINETUNE_RESYNC_SECONDS": "5", "FINETUNE_PROGRESS_INTERVAL": "5", "MALLOC_ARENA_MAX": "2"}
    return spawn(state, "operator", [sys.executable, "-m", "finetune_operator"], env)


def start_procnode(cluster: LocalCluster, state: Path, name: str = "process-node-0") -> int:
    pid = running(state, "procnode")
    if pid:
        return pid
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig)}
    return spawn(state, "procnode", [sys.executable, "-m", "finetune_devcluster", "procnode", "--name", name,
                                     "--workdir", str(state / "procnode"), "--targets-file", str(state / "targets.json")], env)


# ------------------------------------------------------------------------------------- real node

TRAINER_APP, OPERATOR_APP = "finetune-trainer", "finetune-operator"  # app.kubernetes.io/name of their pods


def metrics_targets(pods: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Prometheus file_sd target groups of a real node's running pods: ``trainer`` (every containerPort
    named ``metrics*`` of a training pod: one per local rank) and ``operator`` (the chart's pod, its
    ``metrics`` port), each group labelled with the pod's namespace and name. What a PodMonitor does in
    a real cluster; Debian's Prometheus has no Kubernetes discovery."""
    out: dict[str, list[dict[str, Any]]] = {"trainer": [], "operator": []}
    for pod in pods:
        meta, st = pod.get("metadata") or {}, pod.get("status") or {}
        kind = {TRAINER_APP: "trainer", OPERATOR_APP: "operator"}.get((meta.get("labels") or {}).get("app.kubernetes.io/name"))
        if kind is None or st.get("phase") != "Running" or not st.get("podIP") or meta.get("deletionTimestamp"):
            continue
        ports = sorted(p["containerPort"] for c in pod["spec"].get("containers", []) for p in c.get("ports") or []
                       if str(p.get("name", "")).startswith("metrics"))
        if ports:
            out[kind].append({"targets": [f"{st['podIP']}:{port}" for port in ports],
                              "labels": {"namespace": meta["namespace"], "pod": meta["name"]}})
    return out


def write_targets(path: Path, groups: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(groups, indent=1))
    tmp.replace(path)  # atomic: Prometheus never reads half a file


def start_realnode(state: Path, image_names: list[str], timeout: float = 900) -> tuple[int, dict[str, Any]]:
    """The real node in the background (``python -m finetune_devcluster realnode``, which imports the images
    into its containerd and keeps Prometheus' target files of its pods current): (pid, what it wrote
    once Ready: name, ip, timings)."""
    from .procutil import tail

    ready = state / "realnode.json"
    pid = running(state, "realnode")
    if pid and ready.exists():
        return pid, json.loads(ready.read_text())
    ready.unlink(missing_ok=True)
    pid = spawn(state, "realnode", [sys.executable, "-m", "finetune_devcluster", "realnode", "--state", str(state), *image_names],
                dict(os.environ))
    deadline = time.monotonic() + timeout
    while not ready.exists():
        if not pid_alive(pid, "python"):
            raise RuntimeError(f"the real node did not start; {state / 'realnode.log'}:\n{tail(state / 'realnode.log', 60)}")
        if time.monotonic() > deadline:
            stop(state, "realnode", timeout=150)
            raise RuntimeError(f"the real node was not Ready after {timeout:.0f}s:\n{tail(state / 'realnode.log', 60)}")
        time.sleep(1)
    return pid, json.loads(ready.read_text())


def run_realnode(cluster: LocalCluster, state: Path, image_names: list[str], *, interval: float = 2.0) -> int:
    """Foreground real node (what ``start_realnode`` runs in the background): start it, say so in
    ``<state>/realnode.json``, keep ``targets.json`` (trainer pods) and ``operator-targets.json`` current,
    and on SIGTERM stop it (its pods deleted, containerd, the bridge and kube-proxy's rules removed)."""
    import logging

    from . import images
    from .realnode import RealNode

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    built = [images.build(n) for n in image_names]
    node = RealNode(cluster, 0, images_to_load=built, startup_timeout=300).start()
    stopped = {"flag": False}

    def on_term(*_: Any) -> None:
        stopped["flag"] = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    (state / "realnode.json").write_text(json.dumps({"name": node.name, "ip": node.ip, "timings": node.timings}))
    print(f"real node {node.name} Ready at {node.ip}: {json.dumps(node.timings)}", flush=True)
    try:
        while not stopped["flag"]:
            try:
                code, pods = cluster.request("GET", f"/api/v1/pods?fieldSelector=spec.nodeName={node.name}", timeout=5)
                if code == 200:
                    groups = metrics_targets(pods.get("items", []))
                    write_targets(state / "targets.json", groups["trainer"])
                    write_targets(state / "operator-targets.json", groups["operator"])
            except OSError:
                pass
            time.sleep(interval)
    finally:
        (state / "realnode.json").unlink(missing_ok=True)
        node.stop()
    return 0


def start_prometheus(state: Path, *, operator_targets_file: Path | None = None) -> tuple[int, int] | None:
    """Debian's prometheus, scraping the operator and (file_sd from the node) the trainer pods: the
    operator at its local metrics port, or, ``operator_targets_file``, wherever that file says (its pod
    on a real node). None when prometheus is not installed."""
    import shutil

    import yaml

    from .prometheus import config

    if not shutil.which("prometheus"):
        return None
    port_file = state / "prometheus.port"
    pid = running(state, "prometheus")
    if pid and port_file.exists():
        return pid, int(port_file.read_text())
    operator_port = (state / "operator.port").read_text().strip() if (state / "operator.port").exists() else "8080"
    cfg = state / "prometheus.yml"
    cfg.write_text(yaml.safe_dump(config(str(state / "targets.json"), [] if operator_targets_file else [f"127.0.0.1:{operator_port}"],
                                         interval="5s", operator_targets_file=str(operator_targets_file) if operator_targets_file else None)))
    port = 9090 if port_free(9090) else free_port()
    port_file.write_text(f"{port}\n")
    pid = spawn(state, "prometheus", [shutil.which("prometheus"), f"--config.file={cfg}", f"--storage.tsdb.path={state / 'prometheus-data'}",
                                      f"--web.listen-address=127.0.0.1:{port}"], dict(os.environ))
    return pid, port


DEMO_MLFLOW_PORT = 5000


def start_mlflow(state: Path, s3: Any, host: str = "127.0.0.1") -> tuple[int, int]:
    """The MLflow tracking server (finetune_devcluster.mlflow_server), artifacts in ``s3://mlflow/mlflow``
    on the local S3 server, listening on ``host`` (a real node's address, for its pods): (pid, port). A
    job logs to it with ``spec.tracking.mlflow.uri``."""
    from .mlflow_server import LocalMlflow

    port_file = state / "mlflow.port"
    pid = running(state, "mlflow")
    if pid and port_file.exists():
        return pid, int(port_file.read_text())
    server = LocalMlflow(state / "mlflow", s3=s3, host=host)
    server.workdir.mkdir(parents=True, exist_ok=True)
    s3.create_bucket(server.bucket)
    port = DEMO_MLFLOW_PORT if port_free(DEMO_MLFLOW_PORT, host=host) else free_port()
    port_file.write_text(f"{port}\n")
    return spawn(state, "mlflow", server.argv(port), server.env()), port


def run_procnode(name: str, workdir: str, taint: bool = False, targets_file: str | None = None) -> int:
    """Foreground process node (what ``start_procnode`` runs in the background)."""
    import logging

    from kubernetes import config

    from .procnode import ProcessNode

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    node = ProcessNode(config.new_client_from_config(os.environ.get("KUBECONFIG")), name=name, workdir=workdir, taint=taint,
                       targets_file=targets_file).start()
    stopped = {"flag": False}

    def on_term(*_: Any) -> None:
        stopped["flag"] = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    while not stopped["flag"]:
        time.sleep(0.5)
    node.stop()
    return 0


# ------------------------------------------------------------------------------------------- demo


def ensure_secret(cluster: LocalCluster, namespace: str, access_key: str, secret_key: str) -> None:
    manifest = cluster.kubectl("create", "secret", "generic", SECRET, "-n", namespace,
                               f"--from-literal=AWS_ACCESS_KEY_ID={access_key}", f"--from-literal=AWS_SECRET_ACCESS_KEY={secret_key}",
                               "--dry-run=client", "-o", "yaml").stdout
    cluster.kubectl("apply", "-f", "-", input=manifest)
    # labelled, so an operator with storage.credentialsSecretLabels (the secure mode) reads it too
    from finetune_api.failures import CREDENTIALS_SECRET_LABEL  # the stack runs the operator: it is installed

    key, value = CREDENTIALS_SECRET_LABEL
    cluster.kubectl("label", "secret", SECRET, "-n", namespace, f"{key}={value}", "--overwrite")


def seed(s3: Any, state: Path) -> dict[str, str]:
    from .assets import seed_bucket

    return seed_bucket(s3.client(), DEMO_BUCKET, state / "assets")


def watch(cluster: LocalCluster, names: list[str], namespace: str = "default", timeout: float = 1800, kind: str = "ftj") -> dict[str, dict]:
    """Print the FineTuneJob (or, kind ftsweep, FineTuneSweep) table while they run; return their final objects."""
    deadline = time.monotonic() + timeout
    last = ""
    if not names:
        return {}
    while True:
        table = cluster.kubectl("get", kind, "-n", namespace, *names, check=False).stdout.strip()
        if table != last:
            print(table, flush=True)
            last = table
        objs = {n: json.loads(cluster.kubectl("get", kind, n, "-n", namespace, "-o", "json").stdout) for n in names}
        if all((o.get("status") or {}).get("phase") in ("Succeeded", "Failed") for o in objs.values()):
            return objs
        if time.monotonic() > deadline:
            raise TimeoutError(f"jobs still running after {timeout:.0f}s:\n{table}")
        time.sleep(3)


def sweep_summary(objs: dict[str, dict]) -> str:
    """Each FineTuneSweep's outcome: its trials, the best one and its parameters, its honest test estimate, its model."""
    lines = []
    for name, obj in objs.items():
        st = obj.get("status") or {}
        lines.append(f"\nsweep {name}: {st.get('phase')} {st.get('message', '')}")
        lines.append(f"  trials:      {st.get('completed', 0)} complete, {st.get('pruned', 0)} pruned, {st.get('failed', 0)} failed ({st.get('progress')})")
        for rec in st.get("trials") or []:
            params = ", ".join(f"{k.split('.')[-1]}={v:.4g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}" for k, v in rec["params"].items())
            value = f"{rec['value']:.4g}" if rec.get("value") is not None else "-"
            lines.append(f"    {rec['name']:<22} {rec['state']:<9} {value:>8}  {params}")
        if st.get("bestTrial"):
            lines.append(f"  best trial:  {st['bestTrial']} ({(obj.get('spec') or {}).get('objective', {}).get('metric', 'eval_loss')}={st.get('bestValue'):.4g} "
                         f"on validation) with {json.dumps(st.get('bestParams'), sort_keys=True)}")
        gain = st.get("bestGain") or {}
        if gain:
            lines.append(f"  its test:    {gain.get('metric')} {gain.get('baselineKind') or 'baseline'} {gain.get('baseline')} -> {gain.get('final')} (on {gain.get('split')})")
        if st.get("modelUri"):
            lines.append(f"  model:       {st['modelUri']}")
    return "\n".join(lines)


def summary(objs: dict[str, dict], s3: Any, state: Path, node: str = "process") -> str:
    lines = []
    for name, obj in objs.items():
        st = obj.get("status") or {}
        lines.append(f"\n{name}: {st.get('phase')} ({st.get('reason')}) {st.get('message', '')}")
        if st.get("modelUri"):
            lines.append(f"  model:       {st['modelUri']}")
        gain = st.get("gain") or {}
        if gain:
            on = f" (on {gain['split']})" if gain.get("split") else ""
            lines.append(f"  {gain.get('metric')}: {gain.get('baselineKind') or 'baseline'} {gain.get('baseline')} -> final {gain.get('final')}{on}")
        data = st.get("data") or {}
        if data:
            lines.append("  data:        " + ", ".join(f"{k}={v}" for k, v in data.items() if k != "reportUri"))
        if st.get("latestCheckpoint"):
            lines.append(f"  checkpoint:  {st['latestCheckpoint']}")
        lineage = st.get("lineage") or {}
        if lineage:
            lines.append(f"  lineage:     from job {lineage.get('parentJob')} (model {lineage.get('parentModelUri')}, "
                         f"data report {str(lineage.get('parentDataReportDigest') or '-')[:19]})")
        regression = st.get("regression") or {}
        if regression:
            lines.append("  regression:  " + ", ".join(f"{k}={v}" for k, v in regression.items()))
        tracking = st.get("tracking") or {}
        if tracking.get("tensorboardUri"):
            lines.append(f"  tensorboard: {tracking['tensorboardUri']}")
        if tracking.get("mlflowRunId"):
            lines.append(f"  mlflow run:  {tracking['mlflowRunId']}")
        if tracking.get("problem"):
            lines.append(f"  tracking:    {tracking['problem']}")
    lines.append(f"\nS3 (MinIO):  {s3.endpoint_url}  bucket {DEMO_BUCKET}  (AWS_ACCESS_KEY_ID={s3.access_key})")
    if node == "real":
        lines.append(f"operator:    the chart's Deployment: kubectl logs -n {OPERATOR_NS} deploy/{RELEASE}  "
                     f"(metrics: its pod's address, port 8080, in {state / 'operator-targets.json'})")
    else:
        port = (state / "operator.port").read_text().strip() if (state / "operator.port").exists() else "8080"
        lines.append(f"operator:    http://127.0.0.1:{port}/metrics  (log {state / 'operator.log'})")
    if (state / "prometheus.port").exists():
        lines.append(f"prometheus:  http://127.0.0.1:{(state / 'prometheus.port').read_text().strip()}  "
                     "(e.g. finetune_train_loss, finetune_eval, finetune_tokens_per_second, finetune_operator_jobs)")
    if (state / "mlflow.port").exists():
        mlflow_host = s3.host if node == "real" else "127.0.0.1"
        lines.append(f"mlflow:      http://{mlflow_host}:{(state / 'mlflow.port').read_text().strip()}  "
                     "(a job logs there with spec.tracking.mlflow.uri; artifacts in s3://mlflow/mlflow)")
    if node == "real":
        lines.append("pods:        kubectl get pods -A -o wide (every pod on real-node-0); kubectl logs <trainer pod>")
    else:
        lines.append(f"trainer:     pod sandboxes and logs under {state / 'procnode'}")
    lines.append("kubectl:     eval \"$(python -m finetune_devcluster env)\"; kubectl get ftj; kubectl describe ftj <name>")
    lines.append("stop:        make down")
    return "\n".join(lines)
