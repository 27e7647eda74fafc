"""FineTuneSweep: a hyperparameter search over FineTuneJobs (spec and status; the CRD is generated from them).

A sweep holds a FineTuneJob spec template and a search space over its numeric and enum fields. The
operator runs each trial as a child FineTuneJob (``<sweep>-t<N>``, output under
``<template.output.uri>/<sweep>-t<N>``), reads the monitored metric of every child from its status, and
lets Optuna choose the next parameters and which running trial to prune. The status records every
trial (its parameters, its intermediate and final values), so an operator that restarts rebuilds the
study from the objects alone.

The objective is the template's monitored metric (``evaluation.earlyStopping.metric``, eval_loss when
unset) on validation: that is the number a FineTuneJob reports in ``status.progress.bestMetric`` while it
runs and when it ends.
"""

from __future__ import annotations

import copy
from enum import Enum
from typing import Any

from pydantic import ConfigDict, Field, model_validator
from pydantic.json_schema import JsonDict

from finetune_api import metric_catalogue
from finetune_api.documents import WireModel
from finetune_api.spec import (
    ADAPTER_METHODS,
    API_GROUP,
    API_VERSION,
    FineTuneJobSpec,
    Hyperparameters,
    LoraSpec,
    Method,
    Mode,
    _Model,
    cel,
    parse_spec,
)

_ANY_OBJECT: JsonDict = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
"""The CRD schema of a free-form object field (parameters, overrides, a copied status.gain)."""

SWEEP_KIND = "FineTuneSweep"
SWEEP_PLURAL = "finetunesweeps"
SWEEP_SINGULAR = "finetunesweep"
SWEEP_SHORT_NAMES = ["ftsweep", "fts"]

LABEL_SWEEP = f"{API_GROUP}/sweep"
"""Label on every trial FineTuneJob: the name of its sweep."""
LABEL_TRIAL = f"{API_GROUP}/sweep-trial"
"""Label on every trial FineTuneJob: its trial number."""
LABEL_FINAL = f"{API_GROUP}/sweep-final"
"""Label ("true") on a sweep's final retraining FineTuneJob (final.action retrain)."""
ANNOTATION_PARAMS = f"{API_GROUP}/sweep-params"
"""Annotation on every trial FineTuneJob: its parameters as JSON (path -> value), so a sweep whose status
was lost still knows what each child tried."""

MAX_SWEEP_NAME = 40
"""A trial is ``<sweep>-t<N>`` (N < 10000) and must itself be a valid FineTuneJob name (at most 48 characters)."""
MAX_TRIALS = 1000
MAX_INTERMEDIATE = 64
"""Intermediate values kept per trial (the newest); enough for the pruners, bounded for etcd."""


def _numeric_fields(model: type[_Model], prefix: str) -> dict[str, str]:
    """``path -> kind`` (float, int, bool, enum) for the scalar fields of a spec section."""
    out: dict[str, str] = {}
    for name, field in model.model_fields.items():
        ann = field.annotation
        args = [a for a in getattr(ann, "__args__", (ann,)) if a is not type(None)]
        kind = args[0] if len(args) == 1 else None
        path = f"{prefix}{field.alias or name}"
        if kind is bool:
            out[path] = "bool"
        elif kind is int:
            out[path] = "int"
        elif kind is float:
            out[path] = "float"
        elif isinstance(kind, type) and issubclass(kind, Enum):
            out[path] = "enum"
    return out


SEARCHABLE: dict[str, str] = {
    **_numeric_fields(Hyperparameters, "hyperparameters."),
    **_numeric_fields(LoraSpec, "lora."),
    "method": "enum",
}
"""Every field a sweep may search, as written in a manifest, and its kind."""
SEARCHABLE.pop("hyperparameters.seed", None)  # a seed is not a hyperparameter to optimise


class ParameterType(str, Enum):
    uniform = "uniform"
    log_uniform = "log-uniform"
    int = "int"
    choice = "choice"


_RANGE_TYPES = ("uniform", "log-uniform", "int")


class SearchParameter(_Model):
    """One searched field of the template."""

    path: str = Field(
        description=(
            "The template field to vary, as written in a FineTuneJob: hyperparameters.<field>, lora.<field> or method "
            "(numeric and enum fields only)."
        ),
        json_schema_extra={"enum": list[Any](sorted(SEARCHABLE))},
    )
    type: ParameterType = Field(
        description="uniform or log-uniform: a float in [low, high]; int: an integer in [low, high] (step); choice: one of values."
    )
    low: float | None = Field(default=None, description="Lower bound (uniform, log-uniform, int). log-uniform needs low > 0.")
    high: float | None = Field(default=None, description="Upper bound, included (uniform, log-uniform, int); greater than low.")
    step: int | None = Field(default=None, ge=1, description="int only: the spacing of the values (default 1).")
    values: list[Any] | None = Field(
        default=None,
        min_length=1,
        max_length=64,
        description="choice only: the candidate values (numbers, strings or booleans).",
        json_schema_extra={"items": {"x-kubernetes-preserve-unknown-fields": True}},
    )

    @model_validator(mode="after")
    def _shape(self) -> "SearchParameter":
        kind = SEARCHABLE.get(self.path)
        if kind is None:
            raise ValueError(f"searchSpace path {self.path!r} is not searchable; use one of {', '.join(sorted(SEARCHABLE))}")
        if self.type in _RANGE_TYPES:
            if self.low is None or self.high is None or self.values is not None:
                raise ValueError(f"searchSpace {self.path}: type {self.type} needs low and high, and no values")
            if not self.low < self.high:
                raise ValueError(f"searchSpace {self.path}: low must be less than high")
            if self.type == "log-uniform" and self.low <= 0:
                raise ValueError(f"searchSpace {self.path}: log-uniform needs low > 0")
            if self.type == "int" and (self.low != int(self.low) or self.high != int(self.high)):
                raise ValueError(f"searchSpace {self.path}: type int needs whole-number low and high")
            if kind not in ("int", "float") or (kind == "int" and self.type != "int"):
                raise ValueError(f"searchSpace {self.path} is {kind}-valued: use type {'int or choice' if kind == 'int' else 'choice'}")
        else:
            if self.values is None or self.low is not None or self.high is not None:
                raise ValueError(f"searchSpace {self.path}: type choice needs values, and no low or high")
            if len(set(map(repr, self.values))) != len(self.values):
                raise ValueError(f"searchSpace {self.path}: values must be distinct")
        if self.step is not None and self.type != "int":
            raise ValueError(f"searchSpace {self.path}: step is only valid with type int")
        return self

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                # (values has untyped items, which CEL cannot see: the operator checks values, status InvalidSpec)
                cel("!(self.type in ['uniform', 'log-uniform', 'int']) || (has(self.low) && has(self.high) && self.low < self.high)",
                    "uniform, log-uniform and int need low < high"),
                cel("self.type != 'choice' || (!has(self.low) && !has(self.high))", "choice takes values, no low or high"),
                cel("self.type != 'log-uniform' || self.low > 0.0", "log-uniform needs low > 0"),
                cel("!has(self.step) || self.type == 'int'", "step is only valid with type int"),
            ]
        }
    )

    def candidates(self) -> list[Any]:
        """Every value of a grid over this parameter (choice values; every int of an int range)."""
        if self.type == "choice":
            return list(self.values or [])
        if self.type == "int":
            return list(range(int(self.low or 0), int(self.high or 0) + 1, self.step or 1))
        raise ValueError(f"searchSpace {self.path}: a grid needs type choice or int (a {self.type} range has no grid)")


class Algorithm(str, Enum):
    grid = "grid"
    random = "random"
    tpe = "tpe"


class SearchSpec(_Model):
    """How the next trial's parameters are chosen (Optuna's GridSampler, RandomSampler, TPESampler)."""

    algorithm: Algorithm = Field(default=Algorithm.tpe, description="grid (every combination, choice and int parameters only), random or tpe.")
    seed: int = Field(default=0, ge=0, description="Sampler seed: the same sweep proposes the same trials.")


class Pruner(str, Enum):
    median = "median"
    successive_halving = "successive-halving"


class PruningSpec(_Model):
    """Stop losing trials early from their intermediate evaluations (Optuna's MedianPruner, SuccessiveHalvingPruner).
    A pruned trial's FineTuneJob is suspended (spec.runPolicy.suspend: its pods stop, the object and its
    checkpoints stay); resuming it by hand does not return it to the sweep."""

    type: Pruner = Field(default=Pruner.median, description="median: prune a trial worse than the median of the finished ones at the same step; successive-halving.")
    startup_trials: int = Field(default=2, ge=0, le=1000, description="median: finished trials needed before anything is pruned.")
    warmup_steps: int = Field(default=0, ge=0, description="median: steps of a trial before it can be pruned.")
    min_resource: int = Field(default=1, ge=1, description="successive-halving: steps before the first rung.")
    reduction_factor: int = Field(default=3, ge=2, le=100, description="successive-halving: 1/reductionFactor of the trials go on at each rung.")


class SweepObjective(_Model):
    """What the sweep optimises: a metric of each trial on validation."""

    metric: str = Field(
        default="eval_loss",
        max_length=128,
        description=(
            "The template's monitored metric (evaluation.earlyStopping.metric, eval_loss when unset); each trial's value is "
            "its best validation value (status.progress.bestMetric)."
        ),
    )
    direction: Mode | None = Field(
        default=None,
        description="min or max; default: the metric's own direction (max for accuracy and F1, min for losses and any other metric).",
    )
    split: str = Field(
        default="validation",
        description=(
            "Where trials are compared: validation only. Choosing the winner by its test score would make that score "
            "optimistic (the test split would have taken part in the choice); the best trial's test result is reported "
            "as status.bestGain instead, an honest estimate. With template.dataset.crossValidation a trial's value is "
            "the mean over its folds."
        ),
        json_schema_extra={"enum": ["validation"]},
    )

    @model_validator(mode="after")
    def _split(self) -> "SweepObjective":
        if self.split != "validation":
            raise ValueError(
                "objective.split must be validation: selecting trials on the test split leaks it into the choice; "
                "the best trial's test result is in status.bestGain"
            )
        return self

    @model_validator(mode="before")
    @classmethod
    def _default_direction(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("direction") is None:
            metric = data.get("metric", "eval_loss")
            known = metric_catalogue.direction(metric) if isinstance(metric, str) else None
            data = {**data, "direction": known or Mode.min.value}
        return data

    @model_validator(mode="after")
    def _agrees(self) -> "SweepObjective":
        expected = metric_catalogue.direction(self.metric)
        if expected is not None and self.direction != expected:
            raise ValueError(f"objective.direction must be {expected} for {self.metric}")
        return self


class FinalAction(str, Enum):
    promote = "promote"
    retrain = "retrain"


FINAL_SUFFIX = "final"
"""The retraining FineTuneJob of a sweep is ``<sweep>-final``."""


class FinalSpec(_Model):
    """What the sweep ends with once every trial has finished; its result is status.modelUri."""

    action: FinalAction = Field(
        default=FinalAction.promote,
        description=(
            "promote: the best trial's exported model is the sweep's model (nothing more runs). retrain: one more "
            "FineTuneJob <sweep>-final trains the best trial's parameters on the template with overrides applied "
            "(typically the full schedule, where the trials ran a short one), writing to <output.uri>/<sweep>-final; "
            "its model is the sweep's."
        ),
    )
    overrides: dict[str, Any] | None = Field(
        default=None,
        description=(
            "retrain only: fields set over the template and the best parameters, as a partial FineTuneJob spec "
            "(nested, e.g. {hyperparameters: {maxSteps: 200}}; lists are replaced, not merged). output may not be "
            "overridden. The result must be a valid FineTuneJob."
        ),
        json_schema_extra=_ANY_OBJECT,
    )

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel("!has(self.overrides) || self.action == 'retrain'", "final.overrides is only valid with action retrain"),
            ]
        }
    )


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def monitored_metric(template: FineTuneJobSpec) -> str:
    """The metric a FineTuneJob reports in status.progress.bestMetric (the trainer's ``monitor``)."""
    es = template.evaluation.early_stopping
    return es.metric if es is not None else "eval_loss"


_MONITOR_CEL = (
    "(has(self.template.evaluation) && has(self.template.evaluation.earlyStopping) && has(self.template.evaluation.earlyStopping.metric) "
    "? self.template.evaluation.earlyStopping.metric : 'eval_loss') == "
    "(has(self.objective) && has(self.objective.metric) ? self.objective.metric : 'eval_loss')"
)
_MONITOR_RULE = "objective.metric must be the template's monitored metric (template.evaluation.earlyStopping.metric, eval_loss when unset)"
_GRID_CEL = "!has(self.search) || !has(self.search.algorithm) || self.search.algorithm != 'grid' || self.searchSpace.all(p, p.type in ['choice', 'int'])"
_GRID_RULE = "search.algorithm grid needs every searchSpace parameter of type choice or int"
_LORA_CEL = (
    "!self.searchSpace.exists(p, p.path.startsWith('lora.')) || !has(self.template.method) "
    "|| self.template.method in [%s]" % ", ".join(f"'{m}'" for m in ADAPTER_METHODS)
)
_LORA_RULE = "searchSpace lora.* paths need template.method lora, qlora or dora"
_CV_PRUNE_CEL = "!has(self.pruning) || !has(self.template.dataset.crossValidation)"
_CV_PRUNE_RULE = (
    "pruning is not available with template.dataset.crossValidation: a trial's value is the mean over its folds, "
    "known only when they all finished"
)


class FineTuneSweepSpec(_Model):
    """A hyperparameter search: trials are FineTuneJobs made from template with the searched fields set."""

    template: FineTuneJobSpec = Field(
        description=(
            "The FineTuneJob spec every trial starts from. Each trial sets the searched fields, writes to "
            "<output.uri>/<sweep>-t<N> and runs in the template's Kueue queue (resources.queueName)."
        )
    )
    search_space: list[SearchParameter] = Field(min_length=1, max_length=16, description="The searched fields (distinct paths).")
    objective: SweepObjective = Field(default_factory=SweepObjective, description="The metric optimised and its direction.")
    search: SearchSpec = Field(default_factory=SearchSpec, description="The search algorithm and its seed.")
    pruning: PruningSpec | None = Field(default=None, description="Prune losing trials from their intermediate evaluations; none when unset.")
    max_trials: int = Field(default=10, ge=1, le=MAX_TRIALS, description="Trials to run in all (a grid stops earlier when it is exhausted).")
    parallelism: int = Field(default=1, ge=1, le=100, description="Trials running at once (Kueue quota may hold them back further).")
    max_failed_trials: int = Field(
        default=3, ge=0, le=MAX_TRIALS, description="The sweep fails when more trials than this have failed; no new trial starts after that."
    )
    final: FinalSpec = Field(
        default_factory=FinalSpec,
        description="After the trials: promote the best trial's model (default) or retrain its parameters as <sweep>-final.",
    )

    @model_validator(mode="after")
    def _cross(self) -> "FineTuneSweepSpec":
        paths = [p.path for p in self.search_space]
        if len(set(paths)) != len(paths):
            raise ValueError("searchSpace paths must be distinct")
        if self.objective.metric != monitored_metric(self.template):
            raise ValueError(_MONITOR_RULE)
        if self.search.algorithm == Algorithm.grid.value:
            for p in self.search_space:
                p.candidates()  # raises for a float range
        if any(p.startswith("lora.") for p in paths) and self.template.method not in ADAPTER_METHODS:
            raise ValueError(_LORA_RULE)
        if self.pruning is not None and self.template.dataset.cross_validation is not None:
            raise ValueError(_CV_PRUNE_RULE)
        if self.final.overrides is not None:
            if self.final.action != FinalAction.retrain.value:
                raise ValueError("final.overrides is only valid with action retrain")
            if "output" in self.final.overrides:
                raise ValueError("final.overrides may not set output: the final job writes to <output.uri>/<sweep>-final")
            try:
                trial_spec(self.template, {}, "probe", overrides=self.final.overrides)
            except ValueError as exc:
                raise ValueError(f"final.overrides does not make a valid FineTuneJob: {first_line(exc)}") from None
        methods = [p for p in self.search_space if p.path == "method"]
        if methods and any(p.startswith("lora.") for p in paths) and any(v not in ADAPTER_METHODS for v in methods[0].values or []):
            raise ValueError("searchSpace: lora.* paths need every method value to be lora, qlora or dora")
        for p in self.search_space:  # every bound and candidate must make a valid FineTuneJob
            probes: list[Any] = list(p.values or []) if p.type == "choice" else [p.low, p.high]
            for value in probes:
                if p.type == "int":
                    value = int(value)
                try:
                    trial_spec(self.template, {p.path: value}, "probe")
                except ValueError as exc:
                    raise ValueError(f"searchSpace {p.path}={value!r} does not make a valid FineTuneJob: {first_line(exc)}") from None
        return self

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel("self.searchSpace.all(p, self.searchSpace.exists_one(q, q.path == p.path))", "searchSpace paths must be distinct"),
                cel(_MONITOR_CEL, _MONITOR_RULE),
                cel(_GRID_CEL, _GRID_RULE),
                cel(_LORA_CEL, _LORA_RULE),
                cel(_CV_PRUNE_CEL, _CV_PRUNE_RULE),
            ]
        }
    )

    @property
    def direction(self) -> str:
        return "max" if self.objective.direction == Mode.max.value else "min"


def first_line(exc: Exception) -> str:
    """One line for why a spec does not validate (the same wording as a FineTuneJob's InvalidSpec)."""
    from pydantic import ValidationError

    from finetune_api.validation import validation_message

    if isinstance(exc, ValidationError):
        return validation_message(exc)
    return str(exc).splitlines()[0]


def trial_spec(template: FineTuneJobSpec, params: dict[str, Any], trial_name: str,
               overrides: dict[str, Any] | None = None) -> FineTuneJobSpec:
    """The FineTuneJob spec of one trial: the template with ``params`` (path -> value) set and its own output
    folder (the final retraining: with ``final.overrides`` merged over that). Raises ValidationError when the
    values make an invalid job."""
    wire = copy.deepcopy(template.wire())
    for path, value in params.items():
        node = wire
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    if "lora" in wire and wire.get("method") not in ADAPTER_METHODS:
        wire.pop("lora")  # a searched method full drops the adapter settings
    if wire.get("method") == Method.full.value and any(p.startswith("lora.") for p in params):
        raise ValueError("lora.* parameters with method full")
    if overrides:
        wire = _deep_merge(wire, {k: v for k, v in overrides.items() if k != "output"})
    wire["output"]["uri"] = wire["output"]["uri"].rstrip("/") + "/" + trial_name
    return parse_spec(wire)


def parse_sweep(spec: dict[str, Any]) -> FineTuneSweepSpec:
    return FineTuneSweepSpec.model_validate(spec)


# ------------------------------------------------------------------------------------------ status


class SweepPhase(str, Enum):
    pending = "Pending"
    running = "Running"
    succeeded = "Succeeded"
    failed = "Failed"


class TrialState(str, Enum):
    running = "Running"
    complete = "Complete"
    pruned = "Pruned"
    failed = "Failed"


class IntermediateValue(WireModel):
    step: int = Field(description="Optimizer step of the evaluation.")
    value: float = Field(description="The monitored metric's best value up to that step.")


class TrialRecord(WireModel):
    """One trial, as the sweep last saw it. The study is rebuilt from these on every reconcile."""

    number: int = Field(description="Trial number (the child is <sweep>-t<number>).")
    name: str = Field(description="The trial's FineTuneJob.")
    params: dict[str, Any] = Field(
        description="Searched path -> value.", json_schema_extra=_ANY_OBJECT
    )
    grid_id: int | None = Field(default=None, description="search.algorithm grid: which combination of the grid this is.")
    state: str = Field(description="Running, Complete, Pruned or Failed.", json_schema_extra={"enum": [s.value for s in TrialState]})
    value: float | None = Field(default=None, description="The objective's final value (Complete trials).")
    intermediate: list[IntermediateValue] | None = Field(
        default=None, max_length=MAX_INTERMEDIATE, description="The objective at each evaluation seen while the trial ran (the newest ones)."
    )
    model_uri: str | None = Field(default=None, description="The trial's exported model (Complete trials).")
    gain: dict[str, Any] | None = Field(
        default=None, description="The trial's status.gain (Complete trials): its primary metric before and after, on test when it has a test split.",
        json_schema_extra=_ANY_OBJECT,
    )
    message: str | None = Field(default=None, max_length=1024, description="Why a trial failed or was pruned.")


class FinalRecord(WireModel):
    """final.action retrain: the FineTuneJob that retrains the best trial's parameters."""

    name: str = Field(description="The final FineTuneJob (<sweep>-final).")
    from_trial: str = Field(description="The trial whose parameters it trains.")
    params: dict[str, Any] = Field(
        description="Those parameters.", json_schema_extra=_ANY_OBJECT
    )
    phase: str | None = Field(default=None, description="The final job's phase as the sweep last saw it.")
    value: float | None = Field(default=None, description="Its best validation value of the objective metric.")
    model_uri: str | None = Field(default=None, description="Its exported model.")
    message: str | None = Field(default=None, max_length=1024, description="Why it failed.")


class FineTuneSweepStatus(WireModel):
    """Observed state of the sweep, written by the operator only."""

    phase: str | None = Field(
        default=None, description="Pending (its namespace has not opted in), Running, Succeeded or Failed.",
        json_schema_extra={"enum": [p.value for p in SweepPhase]},
    )
    message: str | None = Field(default=None, max_length=4096, description="Human-readable explanation of the phase.")
    observed_generation: int | None = Field(default=None, description="metadata.generation the operator last acted on.")
    trials: list[TrialRecord] | None = Field(default=None, max_length=MAX_TRIALS, description="Every trial created, in order.")
    running: int | None = Field(default=None, description="Trials running now.")
    completed: int | None = Field(default=None, description="Trials finished with a value.")
    pruned: int | None = Field(default=None, description="Trials stopped early by the pruner.")
    failed: int | None = Field(default=None, description="Trials that failed.")
    progress: str | None = Field(default=None, description="finished/maxTrials, as shown by kubectl get.")
    best_trial: str | None = Field(default=None, description="The FineTuneJob of the best complete trial.")
    best_value: float | None = Field(default=None, description="Its objective value.")
    best_params: dict[str, Any] | None = Field(
        default=None, description="Its parameters.", json_schema_extra=_ANY_OBJECT
    )
    best_model_uri: str | None = Field(default=None, description="Its exported model.")
    best_gain: dict[str, Any] | None = Field(
        default=None,
        description=(
            "Its status.gain: baseline and final of its primary metric on its test split (validation when it has none). "
            "The test split took no part in choosing it, so this is the honest estimate of the sweep's result."
        ),
        json_schema_extra=_ANY_OBJECT,
    )
    final: FinalRecord | None = Field(default=None, description="final.action retrain: the retraining job.")
    model_uri: str | None = Field(
        default=None, description="The sweep's result once Succeeded: the best trial's model (promote) or the final job's (retrain)."
    )


SWEEP_API_VERSION = f"{API_GROUP}/{API_VERSION}"
