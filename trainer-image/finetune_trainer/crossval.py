"""``dataset.crossValidation``: K trainings on K folds, one after another in this job, then the refit.

Why sequential folds in one job rather than K child jobs: the data is read, cleaned, deduplicated,
PII-redacted and leakage-checked once, and every fold sees exactly the same rows and rules; the job keeps
one output, one status, one restart/backoff story and one resume point (the fold index and step are in
every checkpoint's trainer state), and the folds use the job's own GPUs instead of asking the cluster for
K times as many at once. The price is wall time (K + 1 trainings in a row); a sweep over folds is what
FineTuneSweep is for.

The order: the data is prepared once (:mod:`.data.folds` cuts the folds out of the non-test rows). For fold
*k* the trainer is set up afresh (:meth:`~.train.Trainer.setup_training`: the base model, a new head or
adapter from the same seed, a new optimizer and schedule) on the other folds' rows, validates on fold *k*,
and checkpoints under ``<output>/cross-validation/fold-k/checkpoints``. A fold's result is its validation
metrics at its best checkpoint (``evaluation.useBestModel``) or its last step. After the K folds the model
that is exported is a *refit*: the same recipe trained once more on all non-test rows (no validation, so
no early stopping there), checkpointed under ``<output>/checkpoints`` and tested on the test split as usual.
The folds estimate how well that recipe generalises (mean ± standard deviation); the refit uses all the data.

Resume: the newest phase with a complete checkpoint is continued (the refit, else the highest fold), at its
step; the results of the folds before it come back from that checkpoint's trainer state.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from finetune_api.documents import CrossValidationSummary, FoldResult

from .checkpoint import CheckpointManager
from .resume import maybe_resume
from .state import TrainerState

if TYPE_CHECKING:
    from .train import Trainer

log = logging.getLogger(__name__)

FOLDS_FOLDER = "cross-validation"
NOT_AVERAGED = ("step", "eval_samples")  # bookkeeping in an eval entry, not a metric


def fold_output(trainer: Trainer, fold: int) -> str:
    """``<output>/cross-validation/fold-<k>``: fold k's own checkpoints/ folder lives under it."""
    return trainer.join(trainer.output, FOLDS_FOLDER, f"fold-{fold}")


def summarise(results: list[dict[str, Any]], folds: int, *, stratified: bool, current_fold: int | None = None) -> CrossValidationSummary:
    """The finished folds and, for every metric all of them measured, its mean and standard deviation (numpy, ddof 0)."""
    parsed = [FoldResult.model_validate(r) for r in results]
    mean = std = None
    if parsed:
        names = [n for n in parsed[0].metrics if all(n in r.metrics for r in parsed)]
        values = {n: np.array([r.metrics[n] for r in parsed], dtype=np.float64) for n in names}
        mean = {n: float(np.mean(v)) for n, v in values.items()}
        std = {n: float(np.std(v)) for n, v in values.items()}
    return CrossValidationSummary(folds=folds, stratified=stratified, current_fold=current_fold, results=parsed, mean=mean, std=std)


def fold_result(trainer: Trainer, fold: int) -> dict[str, Any]:
    """Fold ``fold``'s FoldResult (wire form) from the trainer's state: the best checkpoint's evaluation, else the last one."""
    st = trainer.state
    entries = st.evals
    entry: dict[str, Any] = entries[-1] if entries else {}
    if trainer.use_best and st.best_step is not None:
        entry = next((e for e in entries if e.get("step") == st.best_step), entry)
    metrics = {k: float(v) for k, v in entry.items() if k not in NOT_AVERAGED and isinstance(v, (int, float)) and math.isfinite(v)}
    data = trainer.data
    return FoldResult(fold=fold, train_rows=len(data.train), validation_rows=len(data.validation) if data.validation is not None else 0,
                      steps=st.step, step=entry.get("step"), metrics=metrics).wire()


def _stratified(trainer: Trainer) -> bool:
    return bool((trainer.data.report.get("cross_validation") or {}).get("stratified"))


def _has_checkpoint(trainer: Trainer, output: str) -> bool:
    manager = CheckpointManager(trainer.storage, output, trainer.work_dir / "checkpoints", trainer.dist, keep_last=1, is_adapter=False,
                                join=trainer.join)
    return bool(manager.complete())


def _start(trainer: Trainer, folds: int) -> int:
    """Where to continue: the fold (1..K) to set up first, or K + 1 for the refit.

    Every rank lists the same checkpoints itself: the process group is joined only when the first fold's
    model is set up, so nothing can be broadcast yet (and maybe_resume then checks that the ranks agree)."""
    if trainer.spec.checkpoint.resume == "none":
        return 1
    if _has_checkpoint(trainer, trainer.output):
        return folds + 1
    return next((k for k in range(folds, 0, -1) if _has_checkpoint(trainer, fold_output(trainer, k))), 1)


def _release(trainer: Trainer) -> None:
    """Drop the last fold's model and optimizer before the next is loaded (one model in memory at a time)."""
    for name in ("model", "optimizer", "scheduler", "raw_model", "model_state", "loaded", "teacher", "evaluator", "accelerator"):
        if hasattr(trainer, name):
            setattr(trainer, name, None)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_folds(trainer: Trainer) -> None:
    """Train fold after fold (resuming where a checkpoint says), publish their summary, then set ``trainer`` up for the refit."""
    cv = trainer.spec.dataset.cross_validation
    assert cv is not None and trainer.data.folds is not None
    pool = trainer.data  # every non-test row in train, no validation
    stratified = _stratified(trainer)
    results: list[dict[str, Any]] = []
    for k in range(_start(trainer, cv.folds), cv.folds + 1):
        fold = pool.folds[k - 1]
        trainer.data = dataclasses.replace(pool, train=pool.train.select(fold.train), validation=pool.train.select(fold.validation))
        trainer.checkpoint_output = fold_output(trainer, k)
        trainer.state = TrainerState(fold=k, folds=list(results))
        _release(trainer)
        trainer.progress.update(force=True, checkpoints=[], latest_checkpoint=None, fold=k)
        trainer.setup_training()
        if maybe_resume(trainer) is None:
            torch.manual_seed(trainer.hp.seed + 1000 * trainer.dist.rank)
        results = list(trainer.state.folds)  # a resumed fold carries the folds before it
        trainer.progress.update(force=True, cross_validation=summarise(results, cv.folds, stratified=stratified, current_fold=k))
        log.info("cross-validation fold %d/%d: %d training rows, %d validation rows", k, cv.folds, len(trainer.data.train), len(fold.validation))
        trainer._stage("training", total_steps=trainer.state.total_steps, best_metric_name=trainer.monitor, fold=k)
        trainer._train()
        trainer.checkpoints.wait()
        results.append(fold_result(trainer, k))
        log.info("cross-validation fold %d/%d: %s", k, cv.folds, results[-1]["metrics"])
    summary = summarise(results, cv.folds, stratified=stratified)
    if results:
        log.info("cross-validation over %d folds: %s", cv.folds,
                 {n: f"{summary.mean[n]:.4g} ± {summary.std[n]:.4g}" for n in summary.mean or {}})
        trainer.progress.update(force=True, cross_validation=summary)
    # The refit: every non-test row, no validation, the job's own checkpoints/ folder.
    trainer.data = pool
    trainer.checkpoint_output = trainer.output
    trainer.state = TrainerState(folds=results)
    _release(trainer)
    trainer.progress.update(force=True, checkpoints=[], latest_checkpoint=None, fold=None)
    trainer.setup_training()


def finish(trainer: Trainer) -> dict[str, Any]:
    """At the end of the refit: the summary (from the refit's state, so also after a resume) in progress.json; its wire
    form for the model card."""
    cv = trainer.spec.dataset.cross_validation
    assert cv is not None
    summary = summarise(trainer.state.folds, cv.folds, stratified=_stratified(trainer))
    trainer.progress.update(force=True, cross_validation=summary)
    return summary.wire()


def card_markdown(card: dict[str, Any] | None) -> str:
    """The model card README's "Cross-validation" section ('' without dataset.crossValidation)."""
    if not card:
        return ""
    results = card.get("results") or []
    names = list(card.get("mean") or {})
    kind = "stratified " if card.get("stratified") else ""
    lines = ["", "## Cross-validation", "",
             f"{card['folds']}-fold {kind}cross-validation on the non-test rows: each fold trained from the same base model with the "
             "same hyperparameters on the other folds and validated on its own; the test split was in no fold. The exported model "
             "is the refit on all non-test rows, tested on the test split (see Evaluation). Mean ± standard deviation over the folds:", ""]
    lines += ["| metric | mean | std | " + " | ".join(f"fold {r['fold']}" for r in results) + " |",
              "| --- | --- | --- | " + " | ".join("---" for _ in results) + " |"]
    for n in names:
        lines.append(f"| {n} | {card['mean'][n]:.4g} | {card['std'][n]:.4g} | " + " | ".join(f"{r['metrics'].get(n, float('nan')):.4g}" for r in results) + " |")
    lines += ["", "Rows per fold (train / validation): " + ", ".join(f"{r['trainRows']} / {r['validationRows']}" for r in results) + "."]
    return "\n".join(lines) + "\n"
