"""The rest of the local stack on top of the control plane and S3: the operator installed with its
Helm chart, a process node that really runs training pods, demo data in S3, and the demo itself.

The chart is installed for real (CRD, ServiceAccount, RBAC, Service) with ``replicaCount=0``: the local
nodes cannot run container images, so the operator runs as a local process authenticated with the
chart's own ServiceAccount token — exactly the rights it has in a real cluster.
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


def start_prometheus(state: Path) -> tuple[int, int] | None:
    """Debian's prometheus, scraping the operator and (file_sd from the process node) the trainer pods.
    None when prometheus is not installed."""
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
    cfg.write_text(yaml.safe_dump(config(str(state / "targets.json"), [f"127.0.0.1:{operator_port}"], interval="5s")))
    port = 9090 if port_free(9090) else free_port()
    port_file.write_text(f"{port}\n")
    pid = spawn(state, "prometheus", [shutil.which("prometheus"), f"--config.file={cfg}", f"--storage.tsdb.path={state / 'prometheus-data'}",
                                      f"--web.listen-address=127.0.0.1:{port}"], dict(os.environ))
    return pid, port


DEMO_MLFLOW_PORT = 5000


def start_mlflow(state: Path, s3: Any) -> tuple[int, int]:
    """The MLflow tracking server (finetune_devcluster.mlflow_server), artifacts in ``s3://mlflow/mlflow``
    on the local S3 server: (pid, port). A job logs to it with ``spec.tracking.mlflow.uri``."""
    from .mlflow_server import LocalMlflow

    port_file = state / "mlflow.port"
    pid = running(state, "mlflow")
    if pid and port_file.exists():
        return pid, int(port_file.read_text())
    server = LocalMlflow(state / "mlflow", s3=s3)
    server.workdir.mkdir(parents=True, exist_ok=True)
    s3.create_bucket(server.bucket)
    port = DEMO_MLFLOW_PORT if port_free(DEMO_MLFLOW_PORT) else free_port()
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


def summary(objs: dict[str, dict], s3: Any, state: Path) -> str:
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
    port = (state / "operator.port").read_text().strip() if (state / "operator.port").exists() else "8080"
    lines.append(f"operator:    http://127.0.0.1:{port}/metrics  (log {state / 'operator.log'})")
    if (state / "prometheus.port").exists():
        lines.append(f"prometheus:  http://127.0.0.1:{(state / 'prometheus.port').read_text().strip()}  "
                     "(e.g. finetune_train_loss, finetune_eval, finetune_tokens_per_second, finetune_operator_jobs)")
    if (state / "mlflow.port").exists():
        lines.append(f"mlflow:      http://127.0.0.1:{(state / 'mlflow.port').read_text().strip()}  "
                     "(a job logs there with spec.tracking.mlflow.uri; artifacts in s3://mlflow/mlflow)")
    lines.append(f"trainer:     pod sandboxes and logs under {state / 'procnode'}")
    lines.append("kubectl:     eval \"$(python -m finetune_devcluster env)\"; kubectl get ftj; kubectl describe ftj <name>")
    lines.append("stop:        make down")
    return "\n".join(lines)
