"""The trainer's bookkeeping that a resumed run needs to continue exactly (``trainer_state.json``).

Tensors (weights, optimizer, scheduler, RNG) live in the checkpoint's other files; this is the rest:
where in the data the next micro-batch comes from, the step counts, early stopping and best-model
state, the loss and evaluation history, and the baseline measured before training.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

HISTORY_LIMIT = 2000  # entries of per-step (and per-eval) history kept in trainer_state.json and the model card


@dataclass
class TrainerState:
    """Everything besides tensors that a resumed run needs to continue exactly (trainer_state.json)."""

    step: int = 0
    epoch: int = 0  # epoch the next micro-batch comes from
    batch: int = 0  # index of the next micro-batch within that epoch
    total_steps: int = 0
    stopped_early: bool = False
    early_stopping: dict[str, Any] | None = None
    best_metric: float | None = None
    best_step: int | None = None
    history: list[dict[str, Any]] = field(default_factory=list)  # one entry per optimizer step
    evals: list[dict[str, Any]] = field(default_factory=list)  # one entry per evaluation
    baseline: dict[str, Any] | None = None
    retention_before: float | None = None
    checkpoint_metrics: dict[str, float | None] = field(default_factory=dict)  # step -> monitored metric
    world_size: int | None = None  # processes that wrote this state (a resume on another count remaps the position)
    fold: int | None = None  # dataset.crossValidation: the fold this state trains (1..K), None for the refit
    folds: list[dict[str, Any]] = field(default_factory=list)  # dataset.crossValidation: the finished folds' FoldResults

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainerState":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def thin_history(entries: list[dict[str, Any]], limit: int) -> None:
    """Keep ``entries`` under ``limit`` in place: the newest ``limit // 2`` stay, older ones are halved.

    Repeated halving of the older part keeps the whole curve's shape at a resolution that falls with age,
    so trainer_state.json (rewritten at every checkpoint) stays small on runs of any length. It is a pure
    function of the entries, so a resumed run thins exactly like an uninterrupted one.
    """
    if len(entries) <= limit:
        return
    keep = limit // 2
    older, recent = entries[:-keep], entries[-keep:]
    entries[:] = older[::2] + recent
