"""Operator scale benchmark: N FineTuneJobs against N plain Jobs on the local kwok cluster, at several N.

For each size (``--jobs 100,500,2000``), on its own fresh cluster, in one run on one machine:
- baseline: N plain batch/v1 Jobs created directly (the Job controller + scheduler + kwok alone);
  time until every pod is Running and the create->Running latency distribution;
- operator: N FineTuneJobs; how long the N create calls took, time until every one has its Job, time
  until every one is Running (as the operator reports in status), p50/p99 create->Running latency,
  and the operator's peak RSS.
The API server's audit log (level Metadata, the two benchmark namespaces only) counts the requests per
job by client: the operator's own (its user agents), and everything in the namespace (controllers,
scheduler, kwok, the benchmark itself). A watch is one request however many events it carries.

The operator runs with the chart's defaults (resync every 10 s, progress every 15 s; ``--resync`` and
``--progress-interval`` change them) and ``MALLOC_ARENA_MAX=2`` as in its image. ``--profile DIR`` runs
py-spy (a dev tool, ``pip install py-spy``) against the operator and writes collapsed stacks there.

The result, with the operator/baseline ratios and the goals (all Running <= 1.5x the plain Jobs,
p50 <= 2x, peak RSS <= 200 MB at 500 jobs), goes to bench/results/operator-scale.json.

    python bench/operator_scale.py [--jobs 100,500,2000] [--out bench/results/operator-scale.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil
import yaml
from kubernetes import client, config, watch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from finetune_devcluster.cluster import LocalCluster  # noqa: E402
from tests.integration.conftest import OperatorProcess  # noqa: E402

BASELINE_NS, OPERATOR_NS = "bench-baseline", "bench-operator"
BENCH_AGENT = "operator-scale-bench"
# The operator's clients: the kubernetes client (reconciles) and Kopf's aiohttp session (watches).
OPERATOR_AGENTS = ("OpenAPI-Generator/", "kopf/")
GOALS = {"all_running_ratio": 1.5, "p50_ratio": 2.0, "peak_rss_mb_at_500": 200.0}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def ftj(i: int) -> dict:
    return {
        "apiVersion": "finetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": f"bench-{i:04d}"},
        "spec": {
            "model": {"uri": "s3://models/tiny"},
            "dataset": {"train": "s3://data/train.jsonl"},
            "output": {"uri": f"s3://out/bench-{i:04d}"},
            "resources": {"nodes": 1, "gpusPerNode": 0},
        },
    }


def plain_job(i: int) -> dict:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": f"base-{i:04d}", "labels": {"bench": "baseline"}},
        "spec": {
            "completionMode": "Indexed", "completions": 1, "parallelism": 1, "backoffLimit": 0,
            "template": {"metadata": {"labels": {"bench": "baseline"}},
                         "spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "trainer"}]}},
        },
    }


def audit_policy() -> dict:
    """Metadata (who, what, when; no bodies) for requests in the two benchmark namespaces, nothing else."""
    return {
        "apiVersion": "audit.k8s.io/v1",
        "kind": "Policy",
        "omitStages": ["RequestReceived"],
        "rules": [{"level": "Metadata", "namespaces": [BASELINE_NS, OPERATOR_NS]}, {"level": "None"}],
    }


def count_requests(audit_log: Path, namespace: str, jobs: int) -> dict[str, Any]:
    """Requests per job in ``namespace`` from the audit log (one ResponseComplete/Panic line per request;
    a watch counts once), split into the operator's own, by verb/resource, and everything."""
    mine: Counter[str] = Counter()
    latency: dict[str, list[float]] = {}  # the API server's own time per request (received -> response complete)
    every = 0
    for path in sorted(audit_log.parent.glob(audit_log.name + "*")):
        for line in path.read_text().splitlines():
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if ev.get("stage") not in ("ResponseComplete", "Panic"):
                continue
            ref = ev.get("objectRef") or {}
            if ref.get("namespace") != namespace:
                continue
            every += 1
            if (ev.get("userAgent") or "").startswith(OPERATOR_AGENTS):
                sub = f"/{ref['subresource']}" if ref.get("subresource") else ""
                call = f"{ev.get('verb')} {ref.get('resource')}{sub}"
                mine[call] += 1
                if ev.get("verb") != "watch":
                    latency.setdefault(call, []).append(
                        (_timestamp(ev["stageTimestamp"]) - _timestamp(ev["requestReceivedTimestamp"])) * 1000)
    return {
        "operator_per_job": round(sum(mine.values()) / jobs, 2),
        "operator_by_call_per_job": {k: round(v / jobs, 2) for k, v in sorted(mine.items(), key=lambda kv: -kv[1])},
        "all_clients_per_job": round(every / jobs, 2),
        "operator_server_ms_p50": {k: round(percentile(v, 50), 1) for k, v in sorted(latency.items())},
    }


def _timestamp(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def watch_running(list_fn, kwargs, is_running, key, n: int, timeout: float) -> dict[str, float]:
    """Record the first time each object is seen running (client clock). Re-watches when the server
    closes the stream, until ``n`` objects were seen or ``timeout`` passed. Objects stay plain dicts
    (no client-model deserialisation), so the watcher costs the machine as little as it can."""
    seen: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    while len(seen) < n and time.monotonic() < deadline:
        w = watch.Watch()
        try:
            for ev in w.stream(list_fn, timeout_seconds=max(1, int(deadline - time.monotonic())), deserialize=False, **kwargs):
                obj = ev["object"]
                if not isinstance(obj, dict) or ev.get("type") == "ERROR":
                    continue
                name = key(obj)
                if name and name not in seen and is_running(obj):
                    seen[name] = time.monotonic()
                    if len(seen) >= n:
                        break
        except Exception as exc:  # a dropped stream: watch again
            print(f"watch restarted: {exc!r}", file=sys.stderr)
            time.sleep(0.5)
        finally:
            w.stop()
    return seen


def _labels(obj: dict) -> dict:
    return (obj.get("metadata") or {}).get("labels") or {}


def _latencies(seen: dict[str, float], created: dict[str, float]) -> list[float]:
    return [seen[k] - created[k] for k in seen if k in created]


def run_size(jobs: int, args: argparse.Namespace) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    (workdir / "audit").mkdir()
    policy = workdir / "audit" / "policy.yaml"
    policy.write_text(yaml.safe_dump(audit_policy()))
    audit_log = workdir / "audit" / "audit.log"
    cluster = LocalCluster(
        nodes=5, workdir=workdir / "cluster", pods=max(220, jobs // 4 + 20), gpus_per_node=8,
        extra_args={"kube-apiserver": [f"--audit-policy-file={policy}", f"--audit-log-path={audit_log}",
                                       "--audit-log-mode=batch", "--audit-log-maxsize=500"]},
    )
    cluster.start()
    timeout = max(300.0, jobs * 0.6)
    result: dict = {"jobs": jobs}
    try:
        config.load_kube_config(str(cluster.kubeconfig))
        api = client.ApiClient()
        api.user_agent = BENCH_AGENT
        core, batch, custom = client.CoreV1Api(api), client.BatchV1Api(api), client.CustomObjectsApi(api)
        env = cluster.env()
        subprocess.run(["kubectl", "apply", "--server-side", "-f", str(ROOT / "crds" / "finetune.io_finetunejobs.yaml")], env=env, check=True, capture_output=True)
        for _ in range(60):  # the CRD may take a moment to be served
            if subprocess.run(["kubectl", "wait", "--for=condition=Established", "--timeout=5s", "crd/finetunejobs.finetune.io"],
                              env=env, capture_output=True).returncode == 0:
                break
            time.sleep(1)
        else:
            raise RuntimeError("the FineTuneJob CRD never became Established")
        for ns in (BASELINE_NS, OPERATOR_NS):
            core.create_namespace({"metadata": {"name": ns}})
        time.sleep(2)

        # ---- baseline: plain Jobs straight to the Job controller
        created: dict[str, float] = {}
        holder: dict = {}
        t = threading.Thread(target=lambda: holder.update(seen=watch_running(
            core.list_namespaced_pod, {"namespace": BASELINE_NS, "label_selector": "bench=baseline"},
            lambda p: (p.get("status") or {}).get("phase") == "Running", lambda p: _labels(p).get("job-name"), jobs, timeout)))
        t.start()
        time.sleep(0.5)  # the watch is open before the first create
        t0 = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            def make(i):
                created[f"base-{i:04d}"] = time.monotonic()
                batch.create_namespaced_job(BASELINE_NS, plain_job(i), _preload_content=False)
            list(pool.map(make, range(jobs)))
        create_calls = time.monotonic() - t0
        t.join()
        seen = holder.get("seen", {})
        lat = _latencies(seen, created)
        result["baseline"] = {
            "create_calls_s": create_calls,
            "all_running_s": (max(seen.values()) - t0) if len(seen) == jobs else None,
            "running": len(seen),
            "p50_create_to_running_s": percentile(lat, 50),
            "p99_create_to_running_s": percentile(lat, 99),
        }
        core.delete_namespace(BASELINE_NS)
        time.sleep(5)  # let the namespace's deletion start before the operator's phase

        # ---- operator
        op = OperatorProcess(str(cluster.kubeconfig), Path(tempfile.mkdtemp(prefix="bench-operator-")), extra_env={
            "FINETUNE_RESYNC_SECONDS": str(args.resync),
            "FINETUNE_PROGRESS_INTERVAL": str(args.progress_interval),
            "FINETUNE_LOG_LEVEL": "INFO",  # the chart's default
        })
        op.start()
        proc = psutil.Process(op.proc.pid)
        profiler = None
        if args.profile:
            args.profile.mkdir(parents=True, exist_ok=True)
            profiler = subprocess.Popen([shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(proc.pid),
                                         "--format", "raw", "--rate", "50", "--nonblocking", "--threads", "--idle",
                                         "-o", str(args.profile / f"operator-{jobs}.txt")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        peak = {"rss": proc.memory_info().rss}
        cpu0 = proc.cpu_times()
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                try:
                    peak["rss"] = max(peak["rss"], proc.memory_info().rss)
                except psutil.Error:
                    return
                time.sleep(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        created = {}
        holder = {}
        jobs_seen: dict[str, float] = {}

        def watch_jobs():
            jobs_seen.update(watch_running(batch.list_namespaced_job, {"namespace": OPERATOR_NS, "label_selector": "app.kubernetes.io/managed-by=finetune-operator"},
                                           lambda j: True, lambda j: _labels(j).get("finetune.io/job"), jobs, timeout))

        tw = threading.Thread(target=watch_jobs)
        tr = threading.Thread(target=lambda: holder.update(seen=watch_running(
            custom.list_namespaced_custom_object, {"group": "finetune.io", "version": "v1alpha1", "namespace": OPERATOR_NS, "plural": "finetunejobs"},
            lambda o: (o.get("status") or {}).get("phase") == "Running", lambda o: o["metadata"]["name"], jobs, timeout)))
        tw.start(), tr.start()
        time.sleep(0.5)
        t0 = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            def make_ftj(i):
                created[f"bench-{i:04d}"] = time.monotonic()
                custom.create_namespaced_custom_object("finetune.io", "v1alpha1", OPERATOR_NS, "finetunejobs", ftj(i), _preload_content=False)
            list(pool.map(make_ftj, range(jobs)))
        created_all = time.monotonic() - t0
        tw.join(), tr.join()
        all_running = time.monotonic() - t0
        time.sleep(args.settle)  # a steady state: every job Running, resyncs only
        stop.set()
        cpu1 = proc.cpu_times()
        seen = holder.get("seen", {})
        lat = _latencies(seen, created)
        result["operator"] = {
            "create_calls_s": created_all,
            "all_jobs_created_s": (max(jobs_seen.values()) - t0) if len(jobs_seen) == jobs else None,
            "jobs_created": len(jobs_seen),
            "all_running_s": (max(seen.values()) - t0) if len(seen) == jobs else None,
            "running": len(seen),
            "p50_create_to_running_s": percentile(lat, 50),
            "p99_create_to_running_s": percentile(lat, 99),
            "mean_create_to_running_s": statistics.fmean(lat) if lat else None,
            "peak_rss_mb": peak["rss"] / 2**20,
            "cpu_s": (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system),
            "cpu_s_window": all_running + args.settle,
        }
        if profiler is not None:
            profiler.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
            profiler.wait(timeout=60)
        op.stop()
        result["operator"]["log_tail"] = op.tail(5).splitlines()
        time.sleep(3)  # the audit batch is flushed
        result["api_requests"] = {"baseline": count_requests(audit_log, BASELINE_NS, jobs), "operator": count_requests(audit_log, OPERATOR_NS, jobs)}
        b, o = result["baseline"], result["operator"]
        result["ratios_operator_over_baseline"] = {
            "all_running": (o["all_running_s"] / b["all_running_s"]) if o["all_running_s"] and b["all_running_s"] else None,
            "p50_latency": o["p50_create_to_running_s"] / b["p50_create_to_running_s"] if b["p50_create_to_running_s"] else None,
            "p99_latency": o["p99_create_to_running_s"] / b["p99_create_to_running_s"] if b["p99_create_to_running_s"] else None,
            "create_calls": o["create_calls_s"] / b["create_calls_s"] if b["create_calls_s"] else None,
        }
        r = result["ratios_operator_over_baseline"]
        result["goals_met"] = {
            "all_running_within_1.5x": bool(r["all_running"] is not None and r["all_running"] <= GOALS["all_running_ratio"]),
            "p50_within_2x": bool(r["p50_latency"] is not None and r["p50_latency"] <= GOALS["p50_ratio"]),
            "peak_rss_under_200mb": o["peak_rss_mb"] <= GOALS["peak_rss_mb_at_500"],
        }
    finally:
        cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return result


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", default="100,500,2000", help="comma-separated sizes, each on its own fresh cluster")
    ap.add_argument("--resync", type=int, default=10, help="FINETUNE_RESYNC_SECONDS of the operator (the chart's default: 10)")
    ap.add_argument("--progress-interval", type=float, default=15.0, help="FINETUNE_PROGRESS_INTERVAL (the chart's default: 15)")
    ap.add_argument("--settle", type=float, default=20.0, help="seconds to keep measuring after every job is Running (steady-state resyncs)")
    ap.add_argument("--profile", type=Path, default=None, help="folder for py-spy's collapsed stacks of the operator")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "operator-scale.json")
    args = ap.parse_args()
    sizes = [int(s) for s in args.jobs.split(",") if s.strip()]
    out: dict = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "operator_settings": {"resync_seconds": args.resync, "progress_interval_s": args.progress_interval, "settle_s": args.settle},
        "goals": GOALS,
        "runs": [],
    }
    for jobs in sizes:
        started = time.monotonic()
        before = load_average()
        res = run_size(jobs, args)
        res["wall_s"] = time.monotonic() - started
        res["load_average_before_after"] = [before, load_average()]
        out["runs"].append(res)
        print(json.dumps(res, indent=2), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2) + "\n")  # after every size: a partial curve survives
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
