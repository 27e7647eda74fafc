"""Prometheus metrics, served by every rank on ``FINETUNE_METRICS_PORT`` (default 9400; 0 turns it off).

Every series carries ``job`` (the FineTuneJob name) and ``rank`` labels so a PodMonitor can scrape all
pods of the group and dashboards can tell ranks apart. The registry is private to the trainer (no
process/platform collectors mixed in) so the names below are the whole contract: all start with
``finetune_``.
"""

from __future__ import annotations

import logging
import os
from threading import Thread
from typing import Any
from wsgiref.simple_server import WSGIServer

from finetune_api import env as pod_env
from finetune_api import metric_catalogue
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

log = logging.getLogger(__name__)

DEFAULT_PORT = 9400

# Eval metrics exported as finetune_eval{metric="<label>"} when present in an evaluation result (the metric table).
EVAL_METRICS = {m.name: m.prometheus for m in metric_catalogue.exported() if m.prometheus}
DATA_COUNTERS = ("rows_read", "rows_kept", "rows_removed", "malformed", "label_conflicts", "exact_duplicates", "near_duplicates", "pii_redacted", "leakage")


class TrainerMetrics:
    def __init__(self, job: str, rank: int, *, port: int | None = None, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self.labels = {"job": job, "rank": str(rank)}
        names = ["job", "rank"]
        r = self.registry

        def gauge(name: str, doc: str, extra: tuple[str, ...] = ()) -> Gauge:
            return Gauge(f"finetune_{name}", doc, names + list(extra), registry=r)

        self.step = gauge("step", "Optimizer steps done.")
        self.total_steps = gauge("total_steps", "Optimizer steps planned.")
        self.epoch = gauge("epoch", "Fractional epoch.")
        self.train_loss = gauge("train_loss", "Training loss of the last optimizer step.")
        self.learning_rate = gauge("learning_rate", "Current learning rate.")
        self.grad_norm = gauge("grad_norm", "Gradient norm before clipping, last step.")
        self.tokens_per_second = gauge("tokens_per_second", "Real (non-pad) tokens processed per second on this rank.")
        self.samples_per_second = gauge("samples_per_second", "Rows processed per second on this rank.")
        self.padding_fraction = gauge("padding_fraction", "Fraction of computed tokens that were padding.")
        self.eval = gauge("eval", "Latest validation metrics.", ("metric",))
        self.best_metric = gauge("best_metric", "Best value of the monitored metric so far.", ("metric",))
        self.stage = gauge("stage", "1 for the stage the trainer is in.", ("stage",))
        self.gpu_memory_allocated = gauge("gpu_memory_allocated_bytes", "torch.cuda.memory_allocated on this rank.")
        self.gpu_memory_reserved = gauge("gpu_memory_reserved_bytes", "torch.cuda.memory_reserved on this rank.")
        self.gpu_memory_peak = gauge("gpu_memory_peak_bytes", "torch.cuda.max_memory_allocated on this rank.")
        self.process_rss = gauge("process_resident_memory_bytes", "Resident memory of this rank's process (the memory that matters on CPU).")
        self.checkpoint_seconds = gauge("checkpoint_save_seconds", "Seconds the last checkpoint took to write and upload.")
        self.checkpoint_bytes = gauge("checkpoint_save_bytes", "Bytes of the last checkpoint.")
        self.checkpoint_step = gauge("checkpoint_step", "Step of the newest complete checkpoint.")
        self.checkpoints_saved = Counter("finetune_checkpoints_saved", "Complete checkpoints written.", names, registry=r)
        self.tokens = Counter("finetune_tokens", "Real tokens trained on by this rank.", names, registry=r)
        self.data_rows = gauge("data_rows", "Data report counters.", ("kind",))
        self._stage: str | None = None
        self._server: tuple[WSGIServer, Thread] | None = None
        self.port = None
        if port is None:
            port = int(os.environ.get(pod_env.METRICS_PORT, DEFAULT_PORT))
        if port:
            # Several ranks of one pod share the pod's network: rank i serves port + local rank.
            port += int(os.environ.get("LOCAL_RANK", 0))
            try:
                self._server = start_http_server(port, registry=self.registry)
                self.port = port
            except OSError as e:
                log.warning("metrics disabled: cannot listen on port %d: %s", port, e)

    def close(self) -> None:
        """Stop serving (the process is about to exit; matters only when the trainer runs in-process)."""
        if self._server is not None:
            server, _thread = self._server
            server.shutdown()
            server.server_close()
            self._server = None

    def _l(self, series: Gauge | Counter, **extra: str) -> Any:
        return series.labels(**self.labels, **extra)

    def set_stage(self, stage: str) -> None:
        if self._stage is not None:
            self._l(self.stage, stage=self._stage).set(0)
        self._l(self.stage, stage=stage).set(1)
        self._stage = stage

    def on_step(self, *, step: int, epoch: float, loss: float, lr: float, grad_norm: float | None, tokens: int,
                samples: int, seconds: float, padding: float | None, **_: Any) -> None:
        self._l(self.step).set(step)
        self._l(self.epoch).set(epoch)
        self._l(self.train_loss).set(loss)
        self._l(self.learning_rate).set(lr)
        if grad_norm is not None:
            self._l(self.grad_norm).set(grad_norm)
        if seconds > 0:
            self._l(self.tokens_per_second).set(tokens / seconds)
            self._l(self.samples_per_second).set(samples / seconds)
        if padding is not None:
            self._l(self.padding_fraction).set(padding)
        self._l(self.tokens).inc(tokens)
        self._gpu_memory()

    def _gpu_memory(self) -> None:
        import resource

        import torch

        # ru_maxrss is in KiB on Linux: the peak, which is what sizing a pod needs
        self._l(self.process_rss).set(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)

        if torch.cuda.is_available():
            self._l(self.gpu_memory_allocated).set(torch.cuda.memory_allocated())
            self._l(self.gpu_memory_reserved).set(torch.cuda.memory_reserved())
            self._l(self.gpu_memory_peak).set(torch.cuda.max_memory_allocated())

    def on_eval(self, result: dict[str, Any], *, best_name: str | None = None, best: float | None = None) -> None:
        for name, label in EVAL_METRICS.items():
            value = result.get(name)
            if isinstance(value, (int, float)):
                self._l(self.eval, metric=label).set(float(value))
        if best_name and best is not None:
            self._l(self.best_metric, metric=best_name).set(best)

    def on_checkpoint(self, step: int, seconds: float, nbytes: int) -> None:
        self._l(self.checkpoint_seconds).set(seconds)
        self._l(self.checkpoint_bytes).set(nbytes)
        self._l(self.checkpoint_step).set(step)
        self._l(self.checkpoints_saved).inc()

    def on_data(self, summary: dict[str, Any]) -> None:
        for kind in DATA_COUNTERS:
            value = summary.get(kind)
            if isinstance(value, (int, float)):
                self._l(self.data_rows, kind=kind).set(value)

    def set_total_steps(self, total: int) -> None:
        self._l(self.total_steps).set(total)
