"""Early stopping and the one "is this better" test.

:func:`improves` compares two values of a metric in the metric's direction (from
:mod:`finetune_api.metric_catalogue`, through ``spec.evaluation.earlyStopping.direction``); early
stopping, best-checkpoint selection and the gain all use it, so they can never disagree on which way
is better. :class:`EarlyStopping` is a small, serialisable plateau detector whose state goes into
checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from finetune_api.metric_catalogue import Direction
from finetune_api.spec import EarlyStopping as EarlyStoppingSpec
from finetune_trainer.errors import InvalidConfig

__all__ = ["EarlyStopping", "improves"]


def improves(value: float, best: float | None, direction: Direction, min_delta: float = 0.0) -> bool:
    """Whether ``value`` beats ``best`` by more than ``min_delta`` in ``direction`` (the first value always does).

    The one comparison behind early stopping, best-checkpoint selection and the gain's verdict, so that
    they can never disagree on which way is better. NaN never improves.
    """
    if math.isnan(value):
        return False
    if best is None:
        return True
    return value < best - min_delta if direction == "min" else value > best + min_delta


class EarlyStopping:
    """Stop when ``metric`` has not improved by more than ``min_delta`` for ``patience`` evaluations in a row.

    Pure and serialisable: :meth:`state_dict` goes into every checkpoint so a resumed run stops exactly where an
    uninterrupted one would. The first value seen is always the best. NaN never counts as an improvement.
    """

    def __init__(self, metric: str, mode: str, patience: int, min_delta: float):
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if patience < 1:
            raise ValueError(f"patience must be at least 1, got {patience}")
        if min_delta < 0:
            raise ValueError(f"min_delta must be non-negative, got {min_delta}")
        self.metric = metric
        self.mode: Direction = "min" if mode == "min" else "max"
        self.patience = int(patience)
        self.min_delta = float(min_delta)
        self._best: float | None = None
        self._best_step: int | None = None
        self._bad_evals = 0

    @classmethod
    def from_spec(cls, spec: EarlyStoppingSpec) -> "EarlyStopping":
        """From ``spec.evaluation.early_stopping``; its mode follows the metric's direction when unset."""
        return cls(metric=spec.metric, mode=spec.direction, patience=spec.patience, min_delta=spec.min_delta)

    @property
    def best(self) -> float | None:
        return self._best

    @property
    def best_step(self) -> int | None:
        return self._best_step

    @property
    def bad_evals(self) -> int:
        return self._bad_evals

    @property
    def should_stop(self) -> bool:
        return self._bad_evals >= self.patience

    def is_improvement(self, value: float) -> bool:
        return improves(value, self._best, self.mode, self.min_delta)

    def update(self, value: float, step: int) -> bool:
        """Record one evaluation; True when ``value`` is the new best."""
        value = float(value)
        if self.is_improvement(value):
            self._best, self._best_step, self._bad_evals = value, int(step), 0
            return True
        self._bad_evals += 1
        return False

    def update_from(self, metrics: Mapping[str, Any], step: int) -> bool:
        """:meth:`update` with ``metrics[self.metric]``, failing with a usable message when it was not computed."""
        if self.metric not in metrics:
            available = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)))
            raise InvalidConfig(
                f"evaluation.earlyStopping.metric {self.metric!r} is not among the computed metrics {available}"
            )
        return self.update(metrics[self.metric], step)

    def state_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "mode": self.mode,
            "patience": self.patience,
            "min_delta": self.min_delta,
            "best": self._best,
            "best_step": self._best_step,
            "bad_evals": self._bad_evals,
        }

    def load_state_dict(self, d: Mapping[str, Any]) -> None:
        """Restore the counters. The metric and mode must match: the spec is immutable, so a mismatch means the
        checkpoint belongs to another job. Patience and min_delta come from this object (the current spec)."""
        if d.get("metric") != self.metric or d.get("mode") != self.mode:
            raise ValueError(
                f"early-stopping state monitors {d.get('metric')!r} ({d.get('mode')}), "
                f"this run monitors {self.metric!r} ({self.mode})"
            )
        self._best = None if d.get("best") is None else float(d["best"])
        self._best_step = None if d.get("best_step") is None else int(d["best_step"])
        self._bad_evals = int(d.get("bad_evals", 0))
