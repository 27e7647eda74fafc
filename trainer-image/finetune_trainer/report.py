"""Stage 5: what the run measured, in one object.

Before training, :func:`measure_baseline` scores every baseline (the starting point, and the fair
no-fine-tune ones: majority class and linear probe for classifiers, k-shot prompting for causal LMs) on
the comparison split, the test set when there is one. After the loop, :func:`final_report` evaluates the
chosen weights once more: the validation set, the temperature fit (classification), the test set (at
that temperature, with ECE before and after it, and BLEU/ROUGE when asked), the retention set, and the
gain over the starting point on the metric the run monitored, test vs test. :class:`RunSummary` then carries those numbers with the
run's bookkeeping; it is what :func:`finetune_trainer.train.run` returns (:meth:`RunSummary.to_dict`),
what the model card is built from, and what :mod:`.export` writes next to the model. The evaluations
themselves go through :class:`~.evaluator.Evaluator`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from finetune_api import metric_catalogue
from finetune_api.documents import BASELINES, STARTING_POINTS, BaselineReport, CalibrationReport
from finetune_api.spec import FineTuneJobSpec

from . import distributed
from .calibration import calibrate, scaled_on
from .evaluate import gain, majority_baseline, retention_check

if TYPE_CHECKING:
    import datasets
    from torch.utils.data import DataLoader

    from .evaluator import Evaluator
    from .state import TrainerState
    from .train import Trainer

log = logging.getLogger(__name__)

DEFAULT_TEST_GENERATIONS = 64  # prompts completed for BLEU/ROUGE on the comparison split when evaluation.maxEvalSamples is unset


def public(result: dict[str, Any] | None) -> dict[str, Any] | None:
    """An eval result without tensors (logits/labels), fit for JSON."""
    if result is None:
        return None
    return {k: v for k, v in result.items() if not isinstance(v, torch.Tensor)}


@dataclass
class FinalEvaluation:
    """The chosen weights, measured once after training (None where there was nothing to measure)."""

    final: dict[str, Any] | None = None  # validation set
    test: dict[str, Any] | None = None  # test set, at the calibrated temperature
    calibration: dict[str, Any] | None = None
    retention: dict[str, Any] | None = None
    gain: dict[str, Any] | None = None  # on the monitored metric (accuracy for classifiers monitoring the loss), on the comparison split
    teacher: dict[str, Any] | None = None  # spec.distillation: the teacher on validation and test (distill.teacher_metrics)


@dataclass
class RunSummary:
    """A finished run: bookkeeping, evaluations and the facts about the model, for the card and the caller."""

    job: str
    spec: FineTuneJobSpec
    steps: int
    total_steps: int
    stopped_early: bool
    best_step: int | None
    best_metric: float | None
    monitor: str
    baseline: dict[str, Any] | None
    evaluation: FinalEvaluation
    history: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    data_report: dict[str, Any] = field(default_factory=dict)
    best_checkpoint: dict[str, Any] | None = None  # uri, step, metric, value of the exported best checkpoint
    precision: str | None = None
    target_modules: list[str] | str | None = None
    world_size: int = 1
    distributed_strategy: str | None = None
    trainable_params: int | None = None
    total_params: int | None = None
    lineage: dict[str, Any] | None = None  # model.fromJob: the parent and the regression gate (lineage.lineage_card)
    cross_validation: dict[str, Any] | None = None  # dataset.crossValidation: the folds and their mean/std (crossval.finish)

    @classmethod
    def of(cls, trainer: Trainer, evaluation: FinalEvaluation, best_checkpoint: dict[str, Any] | None) -> RunSummary:
        """The summary of ``trainer``'s finished run."""
        st, loaded = trainer.state, trainer.loaded
        return cls(
            job=trainer.config.name, spec=trainer.spec, steps=st.step, total_steps=st.total_steps, stopped_early=st.stopped_early,
            best_step=st.best_step, best_metric=st.best_metric, monitor=trainer.monitor, baseline=st.baseline,
            evaluation=evaluation, history=st.history, evals=st.evals, data_report=trainer.data.report,
            best_checkpoint=best_checkpoint, precision=loaded.precision, target_modules=loaded.target_modules,
            world_size=trainer.dist.world_size, distributed_strategy=trainer.strategy,
            trainable_params=loaded.trainable_params, total_params=loaded.total_params,
        )

    @property
    def final_eval(self) -> dict[str, Any] | None:
        return self.evaluation.final

    @property
    def test_eval(self) -> dict[str, Any] | None:
        return self.evaluation.test

    def to_dict(self) -> dict[str, Any]:
        """The run's summary as :func:`finetune_trainer.train.run` returns it."""
        ev = self.evaluation
        summary = {
            "job": self.job, "steps": self.steps, "total_steps": self.total_steps, "stopped_early": self.stopped_early,
            "best_step": self.best_step, "best_metric": self.best_metric, "monitor": self.monitor, "baseline": self.baseline,
            "final_eval": ev.final, "test_eval": ev.test, "calibration": ev.calibration, "retention": ev.retention,
            "gain": ev.gain, "history": self.history, "evals": self.evals,
        }
        if ev.teacher is not None:  # spec.distillation only
            summary["teacher_eval"] = ev.teacher
        return summary

    def training(self) -> dict[str, Any]:
        """The model card's "Training run": how far the run went, what it monitored, and the model's shape."""
        return {
            "steps": self.steps, "total_steps": self.total_steps, "stopped_early": self.stopped_early,
            "best_step": self.best_step, "best_metric": self.best_metric, "monitor": self.monitor,
            "gain": self.evaluation.gain, "history": self.history, "evals": self.evals,
            "precision": self.precision, "target_modules": self.target_modules, "world_size": self.world_size,
            "distributed_strategy": self.distributed_strategy,
            "trainable_params": self.trainable_params, "total_params": self.total_params,
        }


# ---------------------------------------------------------------------------------------- the baselines


def comparison_split(evaluator: Evaluator) -> tuple[str, datasets.Dataset | None, DataLoader | None]:
    """Where the baselines and the fine-tuned model are compared: the test set when there is one (validation chose
    the checkpoint, so it cannot also be the yardstick), else validation. ``(name, dataset, loader)``."""
    if evaluator.data.test is not None and len(evaluator.data.test):
        return "test", evaluator.data.test, evaluator.loader(evaluator.data.test)
    validation, cap = evaluator.data.validation, evaluator.spec.evaluation.max_eval_samples
    if validation is not None and cap is not None and len(validation) > cap:
        validation = validation.select(range(cap))  # the rows evaluator.validation holds (maxEvalSamples)
    return "validation", validation, evaluator.validation


def generation_limit(spec: FineTuneJobSpec) -> int:
    """Prompts completed for BLEU/ROUGE on the comparison split, for the fine-tuned model and every baseline alike."""
    return spec.evaluation.max_eval_samples or DEFAULT_TEST_GENERATIONS


def measure_baseline(evaluator: Evaluator) -> tuple[dict[str, Any] | None, float | None]:
    """Before training: every baseline (``BaselineReport``, when evaluation.baseline is on) and the retention-set
    loss the retention check compares against.

    All baselines are measured on :func:`comparison_split`: the starting point (the base model for a causal LM,
    with BLEU/ROUGE when asked for; the encoder with its untrained head, ``random_head``, for a classifier), then
    for a classifier the majority class and the linear probe on frozen features, for a causal LM with generation
    metrics the k-shot prompting of the base model. A collective under DDP/FSDP.
    """
    spec, data = evaluator.spec, evaluator.data
    report: dict[str, Any] | None = None
    split, dataset, loader = comparison_split(evaluator)
    if spec.evaluation.baseline and loader is not None and dataset is not None:
        reference = ("parent_model" if spec.model.from_job is not None
                     else STARTING_POINTS["sequence-classification" if evaluator.classification else "causal-lm"])
        report = {"split": split, "reference": reference}
        start = public(evaluator.evaluate(loader)) or {}
        if spec.is_preference:
            from .preference import base_model_metrics

            start = base_model_metrics(spec, start)
        if evaluator.generation:
            start.update(distributed.broadcast_object(evaluator.generation_metrics(dataset, generation_limit(spec))) or {})
        report[reference] = start
        log.info("baseline: %s", {k: v for k, v in start.items() if isinstance(v, float)})
        if evaluator.classification:
            train_labels = [int(x) for x in data.train["label"]]
            report["majority_class"] = majority_baseline(train_labels, [int(x) for x in dataset["label"]], evaluator.num_labels)
            report["linear_probe"] = evaluator.linear_probe(dataset)
        elif evaluator.generation:
            few_shot = evaluator.few_shot()
            if few_shot is not None:
                scores = distributed.broadcast_object(evaluator.generation_metrics(dataset, generation_limit(spec), few_shot=few_shot))
                if scores:
                    report.update(k_shot=scores, k=few_shot.k, k_shot_train_rows=list(few_shot.train_rows))
        report["descriptions"] = {kind: BASELINES[kind] for kind in BASELINES if report.get(kind)}
        for kind in ("majority_class", "linear_probe", "k_shot"):
            if report.get(kind):
                log.info("baseline %s on %s: %s", kind, split, {k: v for k, v in report[kind].items() if isinstance(v, float)})
        report = BaselineReport.model_validate(report).model_dump(exclude_none=True)
    retention = evaluator.retention_loader()
    retention_before = float(evaluator.evaluate(retention)["eval_loss"]) if retention is not None else None
    return report, retention_before


# ----------------------------------------------------------------------------------- the final report


def final_report(evaluator: Evaluator, state: TrainerState, monitor: str, monitor_mode: metric_catalogue.Direction) -> FinalEvaluation:
    """Evaluate the weights the model holds now (the best checkpoint's, when it was restored).

    A collective under DDP/FSDP: every rank calls it and gets the same numbers.
    """
    spec, data, classification = evaluator.spec, evaluator.data, evaluator.classification
    report = FinalEvaluation()
    if evaluator.validation is not None:
        report.final = public(evaluator.evaluate(return_logits=False))
    temperature = 1.0
    if classification and spec.evaluation.calibration and evaluator.validation is not None:
        val = evaluator.evaluate(return_logits=True)
        report.calibration = calibrate(val["logits"], val["labels"])
        temperature = report.calibration["temperature"]
    test_loader = evaluator.loader(data.test)
    if test_loader is not None:
        if classification:
            test = evaluator.evaluate(test_loader, temperature=temperature, return_logits=report.calibration is not None)
            if report.calibration is not None:
                report.calibration.update(scaled_on(test["logits"], test["labels"], temperature, prefix="test_"))
            report.test = public(test)
        else:
            report.test = public(evaluator.evaluate(test_loader))
    if report.calibration is not None:
        report.calibration = CalibrationReport.model_validate(report.calibration).model_dump()
    split, dataset, _ = comparison_split(evaluator)
    compared = report.test if split == "test" else report.final
    generation = evaluator.generation_metrics(dataset, generation_limit(spec)) if evaluator.generation else None
    if generation and compared is not None:
        compared.update(generation)
    report.retention = _retention(evaluator, state.retention_before)
    report.gain = _gain(state.baseline, compared, split, monitor, monitor_mode, classification)
    return report


def _retention(evaluator: Evaluator, before: float | None) -> dict[str, Any] | None:
    loader = evaluator.retention_loader()
    retention_spec = evaluator.spec.evaluation.retention
    if loader is None or before is None or retention_spec is None:
        return None
    after = float(evaluator.evaluate(loader)["eval_loss"])
    result = retention_check(before, after, retention_spec)  # raises RetentionExceeded with action fail
    if not result["passed"]:
        log.warning("retention check failed: loss %.4f -> %.4f", result["loss_before"], result["loss_after"])
    return result


def _gain(baseline: dict[str, Any] | None, final: dict[str, Any] | None, split: str, monitor: str,
          monitor_mode: metric_catalogue.Direction, classification: bool) -> dict[str, Any] | None:
    """The starting point -> fine-tuned, both on ``split`` (test when there is one), on the monitored metric (a
    classifier monitoring its loss: accuracy, which the calibration temperature does not change)."""
    metric = "accuracy" if classification and monitor == "eval_loss" else monitor
    if not baseline or not final or baseline.get("split") != split:  # a trainer_state.json of an older trainer: no split
        return None
    start = baseline.get(baseline.get("reference", ""))
    if start and "logp_accuracy" in final and (monitor == "eval_loss" or metric not in start):
        metric = "logp_accuracy"  # preference objectives: the base model's own preference vs the tuned model's (dpo has no base reward)
    if not start or metric not in start or metric not in final:
        return None
    result = gain(start, final, metric, metric_catalogue.direction(metric) or monitor_mode)
    return {**result, "split": split, "baseline_kind": baseline["reference"]}
