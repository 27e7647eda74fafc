"""Operator metrics (Prometheus) and the liveness endpoint, served on one port.

/metrics: jobs by phase, reconciles and errors by handler, reconcile duration, restarts, sweep trials by state
and each sweep's best value.
/healthz: 200 while the operator's event loop has ticked recently, 503 otherwise.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter as PCounter, Gauge, Histogram, generate_latest

from finetune_api.status import Phase

REGISTRY = CollectorRegistry(auto_describe=True)

JOBS = Gauge("finetune_operator_jobs", "FineTuneJobs by phase.", ["phase"], registry=REGISTRY)
RECONCILES = PCounter("finetune_operator_reconciles_total", "Reconciles by handler.", ["handler"], registry=REGISTRY)
DEFERRED = PCounter("finetune_operator_reconciles_deferred_total",
                    "Reconciles left to the ADDED event of the Job this operator just created (finetune_operator.expectations).",
                    registry=REGISTRY)
ERRORS = PCounter("finetune_operator_reconcile_errors_total", "Failed reconciles by handler.", ["handler"], registry=REGISTRY)
DURATION = Histogram(
    "finetune_operator_reconcile_duration_seconds",
    "Reconcile duration by handler.",
    ["handler"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)
RESTARTS = PCounter("finetune_operator_restarts_total", "Training group restarts after failures.", registry=REGISTRY)
TRANSITIONS = PCounter("finetune_operator_phase_transitions_total", "Phase transitions by new phase.", ["phase"], registry=REGISTRY)

SWEEP_TRIALS = Gauge("finetune_operator_sweep_trials", "FineTuneSweep trials by state.", ["namespace", "sweep", "state"], registry=REGISTRY)
SWEEP_BEST = Gauge("finetune_operator_sweep_best_value", "Best objective value of a FineTuneSweep.", ["namespace", "sweep", "metric"], registry=REGISTRY)


def set_phase_counts(phases: Iterable[str | None]) -> None:
    counts = Counter(p or Phase.pending.value for p in phases)
    for phase in Phase:
        JOBS.labels(phase.value).set(counts.get(phase.value, 0))


class Heartbeat:
    """Updated by a task on the operator's event loop; stale means the loop is stuck."""

    def __init__(self, stale_after: float = 60.0):
        self.last = time.monotonic()
        self.stale_after = stale_after

    def beat(self) -> None:
        self.last = time.monotonic()

    def healthy(self) -> bool:
        return time.monotonic() - self.last < self.stale_after


HEARTBEAT = Heartbeat()


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server API)
        if self.path.startswith("/metrics"):
            body, code, ctype = generate_latest(REGISTRY), 200, CONTENT_TYPE_LATEST
        elif self.path.startswith("/healthz"):
            ok = HEARTBEAT.healthy()
            body, code, ctype = (b"ok\n" if ok else b"event loop stalled\n"), (200 if ok else 503), "text/plain"
        else:
            body, code, ctype = b"not found\n", 404, "text/plain"
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:  # keep probes out of the log
        return


def serve(port: int, host: str = "0.0.0.0") -> ThreadingHTTPServer:
    server = ThreadingHTTPServer((host, port), _Handler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
