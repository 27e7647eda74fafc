"""``<output>/progress.json``: what the operator shows in the FineTuneJob status.

Rank 0 only. The document is :class:`finetune_api.documents.ProgressDocument`, the same model the operator
parses. It is rewritten at most every ``min_interval`` seconds during training (object stores charge
per PUT and the operator polls anyway) and at once at every stage change and checkpoint.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime, timezone
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from finetune_api.documents import PROGRESS_FILE, CheckpointRef, DataSummary, Gain, ProgressDocument

if TYPE_CHECKING:
    from .storage import Storage

log = logging.getLogger(__name__)

STAGES = ("starting", "preparing-data", "loading-model", "baseline", "training", "testing", "saving", "done", "preempted", "failed")
KEEP_CHECKPOINT_REFS = 5
# Callers may name a field as it is written (``failureReason``) or as it is declared (``failure_reason``).
_FIELD_BY_ALIAS = {field.alias or name: name for name, field in ProgressDocument.model_fields.items()}


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class ProgressWriter:
    def __init__(self, storage: Storage, output_uri: str, *, enabled: bool, join: Callable[..., str], min_interval: float = 10.0):
        self.storage = storage
        self.uri = join(output_uri, PROGRESS_FILE)
        self.enabled = enabled
        self.min_interval = min_interval
        self.doc = ProgressDocument()
        self._last_write = 0.0
        self._lock = threading.Lock()  # the checkpoint upload thread also reports here
        self._train_start: tuple[float, int] | None = None  # (monotonic time, step) when training (re)started

    # ------------------------------------------------------------------------------------- fields

    def start_clock(self, step: int) -> None:
        self._train_start = (time.monotonic(), step)

    def _eta(self, step: int, total: int | None) -> float | None:
        if not total or self._train_start is None:
            return None
        t0, s0 = self._train_start
        done = step - s0
        if done <= 0:
            return None
        return (time.monotonic() - t0) / done * max(total - step, 0)

    def update(self, *, force: bool = False, **fields: Any) -> None:
        with self._lock:
            for k, v in fields.items():
                setattr(self.doc, _FIELD_BY_ALIAS.get(k, k), v)  # validated (ProgressDocument.validate_assignment)
            if "step" in fields:
                self.doc.eta_seconds = self._eta(self.doc.step, self.doc.total_steps)
            if force or time.monotonic() - self._last_write >= self.min_interval:
                self._write()

    def stage(self, stage: str, **fields: Any) -> None:
        self.update(force=True, stage=stage, **fields)

    def add_checkpoint(self, step: int, uri: str, metric: float | None, kept_steps: set[int] | None = None) -> None:
        with self._lock:
            refs = [c for c in self.doc.checkpoints if c.step != step]
            refs.append(CheckpointRef(step=step, uri=uri, metric=metric))
            if kept_steps is not None:
                refs = [c for c in refs if c.step in kept_steps]
            refs.sort(key=lambda c: c.step)
            self.doc.checkpoints = refs[-KEEP_CHECKPOINT_REFS:]
            self.doc.latest_checkpoint = max(refs, key=lambda c: c.step).uri
            self._write()

    def set_data(self, summary: DataSummary | dict[str, Any] | None) -> None:
        if summary is None:
            return
        if isinstance(summary, dict):
            summary = DataSummary.model_validate(summary)
        self.update(force=True, data=summary)

    def set_gain(self, metric: str, baseline: float | None, final: float | None, *, split: str | None = None,
                 baseline_kind: str | None = None) -> None:
        self.update(force=True, gain=Gain(metric=metric, baseline=baseline, final=final, split=split, baseline_kind=baseline_kind))

    # ------------------------------------------------------------------------------------- output

    def _write(self) -> None:
        if not self.enabled:
            return
        self.doc.updated_at = _now()
        try:
            self.storage.write_json(self.uri, self.doc.wire())
            self._last_write = time.monotonic()
        except Exception as e:  # noqa: BLE001 - progress is advisory; training must not die for it
            log.warning("could not write %s: %s", self.uri, e)
