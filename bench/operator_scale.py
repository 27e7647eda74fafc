"""Operator scale benchmark: 500 FineTuneJobs on the local kwok cluster.

Measures, in one run on one machine:
- baseline: 500 plain batch/v1 Jobs created directly (the Job controller + scheduler + kwok alone);
  time until every pod is Running and the create->Running latency distribution;
- operator: 500 FineTuneJobs; time until every one has its Job, time until every one is Running
  (as the operator reports in status), p50/p99 create->Running latency, and the operator's peak RSS.
The result is written to bench/results/operator-scale.json with the operator/baseline ratios and the
targets (all reconciled within 60 s, RSS under 300 MB).

    python bench/operator_scale.py [--jobs 500] [--out bench/results/operator-scale.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
from kubernetes import client, config, watch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from finetune_devcluster.cluster import LocalCluster  # noqa: E402
from tests.integration.conftest import OperatorProcess  # noqa: E402


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


def watch_running(list_fn, kwargs, is_running, key, n: int, created: dict[str, float], timeout: float) -> dict[str, float]:
    """Record the first time each object is seen running (client clock). Re-watches when the server
    closes the stream, until ``n`` objects were seen or ``timeout`` passed."""
    seen: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    while len(seen) < n and time.monotonic() < deadline:
        w = watch.Watch()
        try:
            for ev in w.stream(list_fn, timeout_seconds=max(1, int(deadline - time.monotonic())), **kwargs):
                obj = ev["object"]
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


def run(jobs: int, out: Path) -> dict:
    cluster = LocalCluster(nodes=5, pods=max(220, jobs // 4 + 20), gpus_per_node=8)
    cluster.start()
    result: dict = {"jobs": jobs, "machine": {"cpus": os.cpu_count(), "python": platform.python_version()}}
    try:
        config.load_kube_config(str(cluster.kubeconfig))
        core, batch, custom = client.CoreV1Api(), client.BatchV1Api(), client.CustomObjectsApi()
        env = cluster.env()
        subprocess.run(["kubectl", "apply", "--server-side", "-f", str(ROOT / "crds" / "finetune.io_finetunejobs.yaml")], env=env, check=True, capture_output=True)
        for _ in range(60):  # the CRD may take a moment to be served
            if subprocess.run(["kubectl", "wait", "--for=condition=Established", "--timeout=5s", "crd/finetunejobs.finetune.io"],
                              env=env, capture_output=True).returncode == 0:
                break
            time.sleep(1)
        else:
            raise RuntimeError("the FineTuneJob CRD never became Established")
        for ns in ("bench-baseline", "bench-operator"):
            core.create_namespace({"metadata": {"name": ns}})
        time.sleep(2)

        # ---- baseline: plain Jobs straight to the Job controller
        created: dict[str, float] = {}
        holder: dict = {}
        t = threading.Thread(target=lambda: holder.update(seen=watch_running(
            core.list_namespaced_pod, {"namespace": "bench-baseline", "label_selector": "bench=baseline"},
            lambda p: p.status.phase == "Running", lambda p: p.metadata.labels.get("job-name"), jobs, created, 300)))
        t.start()
        t0 = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            def make(i):
                created[f"base-{i:04d}"] = time.monotonic()
                batch.create_namespaced_job("bench-baseline", plain_job(i))
            list(pool.map(make, range(jobs)))
        t.join()
        seen = holder.get("seen", {})
        lat = [seen[k] - created[k] for k in seen if k in created]
        result["baseline"] = {
            "all_running_s": (max(seen.values()) - t0) if len(seen) == jobs else None,
            "running": len(seen),
            "p50_create_to_running_s": percentile(lat, 50),
            "p99_create_to_running_s": percentile(lat, 99),
        }
        core.delete_namespace("bench-baseline")

        # ---- operator
        op = OperatorProcess(str(cluster.kubeconfig), Path(tempfile.mkdtemp(prefix="bench-operator-")))
        op.start()
        proc = psutil.Process(op.proc.pid)
        peak = {"rss": proc.memory_info().rss}
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
            jobs_seen.update(watch_running(batch.list_namespaced_job, {"namespace": "bench-operator", "label_selector": "app.kubernetes.io/managed-by=finetune-operator"},
                                           lambda j: True, lambda j: j.metadata.labels.get("finetune.io/job"), jobs, created, 300))

        tw = threading.Thread(target=watch_jobs)
        tr = threading.Thread(target=lambda: holder.update(seen=watch_running(
            custom.list_namespaced_custom_object, {"group": "finetune.io", "version": "v1alpha1", "namespace": "bench-operator", "plural": "finetunejobs"},
            lambda o: (o.get("status") or {}).get("phase") == "Running", lambda o: o["metadata"]["name"], jobs, created, 300)))
        tw.start(), tr.start()
        t0 = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            def make_ftj(i):
                created[f"bench-{i:04d}"] = time.monotonic()
                custom.create_namespaced_custom_object("finetune.io", "v1alpha1", "bench-operator", "finetunejobs", ftj(i))
            list(pool.map(make_ftj, range(jobs)))
        created_all = time.monotonic() - t0
        tw.join(), tr.join()
        stop.set()
        seen = holder.get("seen", {})
        lat = [seen[k] - created[k] for k in seen if k in created]
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
        }
        op.stop()
        result["operator"]["log"] = str(op.log_path)
        b, o = result["baseline"], result["operator"]
        result["ratios_operator_over_baseline"] = {
            "all_running": (o["all_running_s"] / b["all_running_s"]) if o["all_running_s"] and b["all_running_s"] else None,
            "p50_latency": o["p50_create_to_running_s"] / b["p50_create_to_running_s"] if b["p50_create_to_running_s"] else None,
            "p99_latency": o["p99_create_to_running_s"] / b["p99_create_to_running_s"] if b["p99_create_to_running_s"] else None,
        }
        result["targets"] = {
            "all_reconciled_within_60s": bool(o["all_jobs_created_s"] is not None and o["all_jobs_created_s"] <= 60),
            "rss_under_300mb": o["peak_rss_mb"] < 300,
        }
    finally:
        cluster.stop()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=500)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "operator-scale.json")
    args = ap.parse_args()
    print(json.dumps(run(args.jobs, args.out), indent=2))


if __name__ == "__main__":
    main()
