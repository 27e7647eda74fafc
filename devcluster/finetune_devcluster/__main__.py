"""``python -m finetune_devcluster up|down|status|env|build`` (also the ``finetune-devcluster`` script).

up      start the control plane (etcd, kube-apiserver, controller-manager, scheduler, kwok + fake GPU
        nodes), a local S3 server, a process node (runs pods as local processes) and the operator
        (installed with its Helm chart, running with the chart's ServiceAccount) in the background,
        then print the environment to use them (progress on stderr, ``export`` lines on stdout, so
        ``eval "$(... up)"`` works). A second ``up`` reports the running one.
demo    the control plane, a node, S3, the operator, Prometheus, an MLflow server (port 5000 when free), the
        demo models/datasets uploaded to S3, examples/*.yaml applied and watched until they finish; prints
        the model URIs and baseline-vs-final metrics. ``--node real`` (the default): a kubelet + containerd
        node, the chart's operator Deployment in-cluster and the training pods as containers, both from the
        images built here (``make images``), MinIO and MLflow on the node's address (root needed);
        ``--node process``: the process node and the operator as a local process (stack.py says why both).
procnode  run a process node in the foreground.
realnode  run the real node in the foreground (``demo`` starts it in the background).
down    stop everything ``up`` started and remove its state.
status  what is running (exit 0: all up, 1: nothing up, 2: some component down).
env     print ``export`` lines for the running cluster: ``eval "$(python -m finetune_devcluster env)"``.
build   build (or find) every pinned binary; ``--into DIR`` also copies them there (for FINETUNE_BIN_DIR);
        ``--realnode`` also the kubelet and the sandbox binary of a real node.
images  build the project's images with buildah on a debootstrap base (cached by content; images.py).

State lives in ``${FINETUNE_STATE:-~/.local/state/finetune-devcluster}``: ``cluster/`` (certs,
kubeconfig, etcd data, logs/, cluster.json with pids) and ``s3/`` (data, s3.log, s3.json).
"""

from __future__ import annotations

import argparse
import fcntl
import os
import shlex
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from . import tools
from .cluster import ClusterError, LocalCluster
from .s3 import LocalS3, S3Error


def state_dir() -> Path:
    return Path(os.environ.get("FINETUNE_STATE") or Path.home() / ".local" / "state" / "finetune-devcluster").expanduser()


def cluster_dir() -> Path:
    """The cluster ``up`` keeps running (``LocalCluster.attach`` finds it here)."""
    return state_dir() / "cluster"


def s3_dir() -> Path:
    """The S3 server ``up`` keeps running (``LocalS3.attach`` finds it here)."""
    return state_dir() / "s3"


@contextmanager
def _locked() -> Iterator[None]:
    state_dir().mkdir(parents=True, exist_ok=True)
    with open(state_dir() / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def _attach_cluster() -> LocalCluster | None:
    try:
        return LocalCluster.attach(cluster_dir())
    except (OSError, ValueError, KeyError):
        return None


def _attach_s3() -> LocalS3 | None:
    try:
        return LocalS3.attach(s3_dir())
    except (OSError, ValueError, KeyError):
        return None


def env_lines(cluster: LocalCluster | None, s3: LocalS3 | None) -> list[str]:
    out = []
    if cluster is not None:
        out.append(f"export KUBECONFIG={shlex.quote(str(cluster.kubeconfig))}")
        k = tools.find("kubectl")
        h = tools.find("helm")
        dirs = list(dict.fromkeys(str(p.parent) for p in (k, h) if p))
        if dirs:
            out.append(f'export PATH={shlex.quote(os.pathsep.join(dirs))}:"$PATH"')
    if s3 is not None:
        for k, v in s3.env({}).items():
            out.append(f"export {k}={shlex.quote(v)}")
    return out


# --------------------------------------------------------------------------------------- up steps
# ``up`` runs these in order; each returns what it started (or found running). Further steps (e.g.
# installing the operator's chart with helm into the new cluster) go into UP_STEPS after "s3".


def up_cluster(args: argparse.Namespace, ctx: dict) -> None:
    existing = _attach_cluster()
    if existing is not None:
        alive = existing.running()
        if alive and all(alive.values()):
            print(f"cluster already running: {existing.server} (state {existing.workdir})", file=sys.stderr)
            ctx["cluster"] = existing
            return
        print(f"stale cluster state in {existing.workdir} (running: {alive}); cleaning it up", file=sys.stderr)
        existing.stop()
    shutil.rmtree(cluster_dir(), ignore_errors=True)
    t0 = time.monotonic()
    c = LocalCluster(
        nodes=args.nodes, workdir=cluster_dir(), gpus_per_node=args.gpus_per_node, detach=True, keep_workdir=True,
        apiserver_bind_address=getattr(args, "apiserver_bind_address", "127.0.0.1"),
    )
    c.start()
    print(f"cluster up in {time.monotonic() - t0:.1f}s: {c.server}, nodes {', '.join(c.node_names)}", file=sys.stderr)
    ctx["cluster"] = c


def up_s3(args: argparse.Namespace, ctx: dict) -> None:
    if args.no_s3:
        return
    existing = _attach_s3()
    if existing is not None:
        if existing.running():
            print(f"s3 already running: {existing.endpoint_url} ({existing.backend})", file=sys.stderr)
            ctx["s3"] = existing
            return
        existing.stop()
    shutil.rmtree(s3_dir(), ignore_errors=True)
    s3 = LocalS3(s3_dir(), backend=args.s3_backend, detach=True, keep_workdir=True, port=args.s3_port,
                 host=getattr(args, "s3_host", "127.0.0.1"))
    s3.start()
    for b in args.bucket or []:
        s3.create_bucket(b)
    print(f"s3 up: {s3.endpoint_url} ({s3.backend}); buckets: {', '.join(args.bucket or []) or '-'}", file=sys.stderr)
    ctx["s3"] = s3


def up_procnode(args: argparse.Namespace, ctx: dict) -> None:
    if args.no_procnode:
        return
    from . import stack

    pid = stack.start_procnode(ctx["cluster"], state_dir())
    print(f"process node up (pid {pid}): pods bound to it run as local processes; log {state_dir() / 'procnode.log'}", file=sys.stderr)


def up_operator(args: argparse.Namespace, ctx: dict) -> None:
    if args.no_operator:
        return
    from . import stack

    pid = stack.start_operator(ctx["cluster"], state_dir())
    s3 = ctx.get("s3")
    if s3 is not None:
        stack.ensure_secret(ctx["cluster"], "default", s3.access_key, s3.secret_key)
    print(f"operator installed with helm ({stack.RELEASE} in {stack.OPERATOR_NS}) and running as its ServiceAccount "
          f"(pid {pid}); metrics http://127.0.0.1:{(state_dir() / 'operator.port').read_text().strip()}/metrics; log {state_dir() / 'operator.log'}", file=sys.stderr)


def up_prometheus(args: argparse.Namespace, ctx: dict) -> None:
    if args.no_operator:
        return
    from . import stack

    started = stack.start_prometheus(state_dir())
    if started is None:
        print("prometheus not installed (apt-get install prometheus): metrics are not scraped", file=sys.stderr)
        return
    print(f"prometheus up (pid {started[0]}): http://127.0.0.1:{started[1]} scrapes the operator and the trainer pods", file=sys.stderr)


def up_mlflow(s3: LocalS3) -> None:
    """The demo's MLflow server (``demo`` only: ``up`` leaves it out, so its bucket is not there either)."""
    from . import stack

    pid, port = stack.start_mlflow(state_dir(), s3)
    print(f"mlflow up (pid {pid}): http://127.0.0.1:{port} (log to it with spec.tracking.mlflow.uri: http://127.0.0.1:{port}; "
          f"artifacts in s3://mlflow/mlflow; log {state_dir() / 'mlflow.log'})", file=sys.stderr)


UP_STEPS = [("cluster", up_cluster), ("s3", up_s3), ("procnode", up_procnode), ("operator", up_operator), ("prometheus", up_prometheus)]


def cmd_up(args: argparse.Namespace) -> int:
    ctx: dict = {}
    with _locked():
        for name, step in UP_STEPS:
            try:
                step(args, ctx)
            except (ClusterError, S3Error, tools.ToolError) as e:
                print(f"up: step {name!r} failed:\n{e}", file=sys.stderr)
                print(f"logs kept in {state_dir()}; run 'down' to clean up", file=sys.stderr)
                return 1
    print("# to use it: eval \"$(python -m finetune_devcluster env)\"")
    print("\n".join(env_lines(ctx.get("cluster"), ctx.get("s3"))))
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    from . import stack

    with _locked():
        for name in ("mlflow", "prometheus", "operator", "procnode", "realnode"):
            # the real node deletes its pods and stops containerd, kube-proxy and its bridge: give it time
            if stack.stop(state_dir(), name, timeout=150 if name == "realnode" else 30):
                print(f"{name} stopped")
        s3, c = _attach_s3(), _attach_cluster()
        if s3 is not None:
            s3.stop()
            print("s3 stopped")
        if c is not None:
            c.stop()
            print("cluster stopped")
        if s3 is None and c is None:
            print("nothing running")
        shutil.rmtree(s3_dir(), ignore_errors=True)
        shutil.rmtree(cluster_dir(), ignore_errors=True)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    c, s3 = _attach_cluster(), _attach_s3()
    if c is None and s3 is None:
        print(f"not running (state {state_dir()})")
        return 1
    ok = True
    if c is not None:
        alive = c.running()
        ok &= all(alive.values())
        print(f"cluster {c.server} kubeconfig {c.kubeconfig}")
        for n, up in alive.items():
            print(f"  {n:<24} {'running' if up else 'DOWN'} (pid {c.components[n].pid})")
        if all(alive.values()):
            code, nodes = c.request("GET", "/api/v1/nodes")
            if code == 200:
                for n in nodes["items"]:
                    ready = {x["type"]: x["status"] for x in n["status"].get("conditions", [])}.get("Ready")
                    gpus = n["status"].get("allocatable", {}).get("nvidia.com/gpu", "0")
                    print(f"  node {n['metadata']['name']:<19} Ready={ready} gpus={gpus}")
    if s3 is not None:
        up = s3.running()
        ok &= up
        print(f"s3 {s3.endpoint_url} ({s3.backend}) {'running' if up else 'DOWN'}")
    return 0 if ok else 2


def cmd_env(args: argparse.Namespace) -> int:
    c, s3 = _attach_cluster(), _attach_s3()
    if c is None and s3 is None:
        print("# finetune-devcluster is not running; run: python -m finetune_devcluster up", file=sys.stderr)
        return 1
    print("\n".join(env_lines(c, s3)))
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    names = args.tools or list(tools.DEFAULT_TOOLS) + (list(tools.REALNODE_TOOLS) if args.realnode else [])
    t0 = time.monotonic()
    try:
        paths = tools.ensure_all(names, verbose=args.verbose)
    except tools.ToolError as e:
        print(str(e), file=sys.stderr)
        return 1
    for n, p in paths.items():
        print(f"{n:<24} {p}")
        if args.into:
            dest = Path(args.into).expanduser()
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copy2(p, dest / n)
    print(f"done in {time.monotonic() - t0:.0f}s" + (f"; copied into {args.into}" if args.into else ""))
    return 0


def cmd_images(args: argparse.Namespace) -> int:
    from . import images

    t0 = time.monotonic()
    try:
        built = [images.build(n) for n in args.images]
        pause = images.ensure_pause_archive()
    except (images.ImageError, tools.ToolError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for b in [*built, pause]:
        state = f"built in {b.seconds:.0f}s" if b.seconds else "cached"
        print(f"{b.name:<10} {b.ref:<48} {state:<16} {b.archive}")
    print(f"done in {time.monotonic() - t0:.0f}s")
    return 0


def _demo_process(args: argparse.Namespace) -> tuple[LocalCluster, LocalS3] | None:
    """up with only the process node; the operator as a local process with the chart's ServiceAccount."""
    from . import stack

    args.nodes, args.no_s3, args.no_operator, args.no_procnode = 0, False, False, False
    if cmd_up(args):
        return None
    c, s3 = _attach_cluster(), _attach_s3()
    kwok = [n for n in c.node_names]
    if kwok:
        print(f"note: this cluster also has kwok nodes {kwok}; `make down` first for a process-node-only demo", file=sys.stderr)
    if s3.port != stack.DEMO_S3_PORT:
        print(f"error: S3 runs on port {s3.port}, but examples/ name http://127.0.0.1:{stack.DEMO_S3_PORT}: free that port and re-run", file=sys.stderr)
        return None
    up_mlflow(s3)
    return c, s3


def _demo_real(args: argparse.Namespace) -> tuple[LocalCluster, LocalS3] | None:
    """The control plane (API server beyond loopback, so pods reach it), the real node running the images
    built here, MinIO on the node's address, the chart's operator Deployment, Prometheus and MLflow."""
    from . import images, stack
    from .realnode import RealNodeError

    if os.geteuid() != 0 or not shutil.which("containerd"):
        print("error: the real-node demo runs containerd and makes a bridge: it needs root and `make node-deps`; "
              "`python -m finetune_devcluster demo --node process` runs the pods as local processes instead", file=sys.stderr)
        return None
    with _locked():
        existing = _attach_cluster()
        if existing is not None and any(existing.running().values()) and existing.apiserver_bind_address == "127.0.0.1":
            print("error: a cluster started by `up` or `demo --node process` is running (its API server on loopback, "
                  "which pods cannot reach): `make down` first", file=sys.stderr)
            return None
        t0 = time.monotonic()
        try:
            built = {n: images.build(n) for n in ("operator", "trainer")}
        except (images.ImageError, tools.ToolError) as e:
            print(f"error: building the images: {e}", file=sys.stderr)
            return None
        print("images: " + ", ".join(f"{b.ref} ({'built in %.0fs' % b.seconds if b.seconds else 'cached'})" for b in built.values()),
              file=sys.stderr)
        args.nodes, args.apiserver_bind_address = 0, "0.0.0.0"
        try:
            up_cluster(args, {})
            t1 = time.monotonic()
            _, node = stack.start_realnode(state_dir(), list(built))
            timings = node["timings"]
            print(f"real node {node['name']} Ready at {node['ip']} in {time.monotonic() - t1:.0f}s (images imported in "
                  f"{timings.get('images_import_s', 0):.0f}s; kube-proxy, CoreDNS at 10.96.0.10); log {state_dir() / 'realnode.log'}",
                  file=sys.stderr)
            args.s3_host, args.no_s3 = node["ip"], False
            ctx: dict = {}
            up_s3(args, ctx)
            s3 = ctx["s3"]
            if s3.host != node["ip"] or s3.port != stack.DEMO_S3_PORT:
                print(f"error: S3 runs at {s3.endpoint_url}, not http://{node['ip']}:{stack.DEMO_S3_PORT}: `make down` and re-run",
                      file=sys.stderr)
                return None
            c = _attach_cluster()
            stack.ensure_secret(c, "default", s3.access_key, s3.secret_key)
            pid, port = stack.start_mlflow(state_dir(), s3, host=node["ip"])
            mlflow = f"http://{node['ip']}:{port}"
            print(f"mlflow up (pid {pid}): {mlflow} (log {state_dir() / 'mlflow.log'})", file=sys.stderr)
            pod = stack.install_chart_in_cluster(c, built["operator"].ref, built["trainer"].ref, [s3.endpoint_url, mlflow])
            print(f"operator: the chart's Deployment ({stack.RELEASE} in {stack.OPERATOR_NS}), pod {pod['metadata']['name']} Ready on "
                  f"{pod['spec']['nodeName']} at {pod['status']['podIP']} (`kubectl logs -n {stack.OPERATOR_NS} deploy/{stack.RELEASE}`); "
                  f"jobs may name only {s3.endpoint_url} and {mlflow}", file=sys.stderr)
            started = stack.start_prometheus(state_dir(), operator_targets_file=state_dir() / "operator-targets.json")
            if started is not None:
                print(f"prometheus up (pid {started[0]}): http://127.0.0.1:{started[1]} scrapes the operator pod and the trainer pods",
                      file=sys.stderr)
        except (ClusterError, S3Error, RealNodeError, RuntimeError) as e:
            print(f"demo: {e}\nlogs kept in {state_dir()}; run 'make down' to clean up", file=sys.stderr)
            return None
        print(f"set up in {time.monotonic() - t0:.0f}s", file=sys.stderr)
    return c, s3


def cmd_demo(args: argparse.Namespace) -> int:
    """The stack (``--node real`` or ``process``) + demo data in S3 + examples/*.yaml and examples/sweeps/*.yaml
    applied + watched to the end."""
    from . import stack

    up = _demo_real(args) if args.node == "real" else _demo_process(args)
    if up is None:
        return 1
    c, s3 = up
    host = s3.host if args.node == "real" else None
    if (state_dir() / "mlflow.port").read_text().strip() != str(stack.DEMO_MLFLOW_PORT):
        print(f"note: MLflow runs on another port than examples/sentiment-tracked.yaml names ({stack.DEMO_MLFLOW_PORT}): "
              "that job will train without it (status.tracking.problem says so)", file=sys.stderr)
    print("uploading the demo models and datasets to S3 ...", file=sys.stderr)
    uris = stack.seed(s3, state_dir())
    print("  " + "\n  ".join(f"{k}: {v}" for k, v in uris.items()), file=sys.stderr)
    def apply(path: Path) -> str | None:
        """kubectl apply of an example; on a real node with its endpoints pointed at the node's address."""
        text = path.read_text()
        out = c.kubectl("apply", "-f", "-", input=stack.for_node(text, host) if host else text, check=False)
        print((out.stdout or out.stderr).strip(), file=sys.stderr)
        return out.stdout.split()[0].split("/")[-1] if out.returncode == 0 else None

    if host:
        print(f"applying examples/ with their endpoints http://127.0.0.1:<port> pointed at the node, http://{host}:<port>",
              file=sys.stderr)
    names = [n for n in map(apply, sorted(stack.EXAMPLES.glob("*.yaml"))) if n]
    sweeps = [n for n in map(apply, sorted((stack.EXAMPLES / "sweeps").glob("*.yaml"))) if n]
    print(f"watching {', '.join(names)} (kubectl get ftj -w shows the same) ...", file=sys.stderr)
    objs = stack.watch(c, names)
    print(f"watching sweeps {', '.join(sweeps)} (kubectl get ftsweep -w) ...", file=sys.stderr)
    sweep_objs = stack.watch(c, sweeps, kind="ftsweep")
    print(stack.summary(objs, s3, state_dir(), node=args.node))
    print(stack.sweep_summary(sweep_objs))
    return 0 if all(o["status"]["phase"] == "Succeeded" for o in [*objs.values(), *sweep_objs.values()]) else 1


def cmd_realnode(args: argparse.Namespace) -> int:
    from . import stack

    c = _attach_cluster()
    if c is None:
        print(f"no cluster in {cluster_dir()}: start one first (demo does)", file=sys.stderr)
        return 1
    state = Path(args.state).expanduser()
    state.mkdir(parents=True, exist_ok=True)
    return stack.run_realnode(c, state, args.images)


def cmd_procnode(args: argparse.Namespace) -> int:
    from . import stack

    return stack.run_procnode(args.name, args.workdir, taint=args.taint, targets_file=args.targets_file)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="finetune-devcluster", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start cluster + S3 in the background")
    up.add_argument("--nodes", type=int, default=2, help="fake GPU nodes (default 2)")
    up.add_argument("--gpus-per-node", type=int, default=8)
    up.add_argument("--no-s3", action="store_true", help="do not start the S3 server")
    up.add_argument("--s3-backend", choices=["minio", "moto"], default=None, help="default: $FINETUNE_S3_BACKEND or minio")
    up.add_argument("--bucket", action="append", help="create this bucket (repeatable)")
    up.add_argument("--s3-port", type=int, default=9000, help="S3 port when free (default 9000, which examples/ use)")
    up.add_argument("--no-procnode", action="store_true", help="no process node (pods only on kwok nodes)")
    up.add_argument("--no-operator", action="store_true", help="do not install and start the operator")
    demo = sub.add_parser("demo", help="up + demo data + examples/*.yaml run to completion")
    demo.add_argument("--gpus-per-node", type=int, default=0)
    demo.add_argument("--s3-backend", choices=["minio", "moto"], default=None)
    demo.add_argument("--bucket", action="append", default=["finetune-demo"])
    demo.add_argument("--s3-port", type=int, default=9000)
    demo.add_argument("--node", choices=["real", "process"], default="real",
                      help="real (default): a kubelet + containerd node running the images built here (root); "
                           "process: pods as local processes, the operator as a local process")
    rn = sub.add_parser("realnode", help="run the real node in the foreground (demo starts one in the background)")
    rn.add_argument("images", nargs="*", default=["operator", "trainer"], help="images to import into its containerd")
    rn.add_argument("--state", default=str(state_dir()), help="where realnode.json and the Prometheus target files go")
    pn = sub.add_parser("procnode", help="run a process node in the foreground (up starts one in the background)")
    pn.add_argument("--name", default="process-node-0")
    pn.add_argument("--workdir", default=str(state_dir() / "procnode"))
    pn.add_argument("--taint", action="store_true", help="only pods tolerating finetune.io/process-node land here")
    pn.add_argument("--targets-file", default=None, help="keep a Prometheus file_sd list of the pods' metrics endpoints here")
    sub.add_parser("down", help="stop everything")
    sub.add_parser("status", help="show what is running")
    sub.add_parser("env", help="print export lines")
    b = sub.add_parser("build", help="build/find all pinned binaries")
    b.add_argument("tools", nargs="*", help=f"subset of {', '.join(tools.TOOLS)}")
    b.add_argument("--into", help="also copy the binaries into this folder")
    b.add_argument("-v", "--verbose", action="store_true", help="stream go's output")
    b.add_argument("--realnode", action="store_true", help=f"also what a real node needs ({', '.join(tools.REALNODE_TOOLS)})")
    im = sub.add_parser("images", help="build the project's images with buildah (cached by content) for a real node")
    im.add_argument("images", nargs="*", default=["operator"], help="operator (default) and/or trainer")
    args = p.parse_args(argv)
    commands = {"up": cmd_up, "down": cmd_down, "status": cmd_status, "env": cmd_env, "build": cmd_build,
                "demo": cmd_demo, "procnode": cmd_procnode, "realnode": cmd_realnode, "images": cmd_images}
    return commands[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
