"""The model card written next to the final model: ``model_card.json`` for machines and ``README.md`` for people.

The README follows the Hugging Face model-card layout (YAML front matter with ``base_model``, ``library_name``,
``pipeline_tag``, ``tags`` and a ``model-index`` of results, then Model details, Training data, Training procedure,
Evaluation, Calibration, Retention, Limitations), so it reads well on the Hub or any registry that renders model
cards. Everything optional (baseline, test set, calibration, retention, best checkpoint) may be ``None``: the card
then says what was not measured instead of leaving a gap, and lists it under Limitations.

Pure (no I/O); numbers are formatted once, here, by :func:`fmt`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any


from finetune_api import metric_catalogue
from finetune_api.documents import BASELINES
from finetune_api.spec import FineTuneJobSpec
from finetune_trainer.data.pii import coverage as pii_coverage
from finetune_trainer.evaluate import gain
from finetune_trainer.report import RunSummary

CARD_SCHEMA_VERSION = 1

# From the one metric table: which way is better (gains are judged only for these), titles and order.
METRIC_MODES = {m.name: m.direction for m in metric_catalogue.METRICS if m.direction is not None}
METRIC_TITLES = {m.name: m.title for m in metric_catalogue.METRICS}
METRIC_ORDER = [m.name for m in metric_catalogue.METRICS]
COUNT_METRICS = {m.name for m in metric_catalogue.METRICS if m.direction is None}
# Never copied into the card: tensors evaluate_classification returns on request; bookkeeping of a baseline.
NON_METRIC_KEYS = {"per_class", "logits", "labels", "majority_class", "train_samples", "prompts_shortened"}
# How the card names each baseline (finetune_api.documents.BASELINES says what each is).
BASELINE_TITLES = {"base_model": "Base model", "k_shot": "k-shot base model", "random_head": "Random head", "parent_model": "Parent model",
                   "majority_class": "Majority class", "linear_probe": "Linear probe"}
FAIR_BASELINES = ("linear_probe", "k_shot")  # the no-fine-tune baselines a fine-tune has to beat to be worth it
MAX_REPORT_ROWS = 60
SMALL_EVAL_SET = 200
ECE_STILL_HIGH = 0.05


# ------------------------------------------------------------------------------------------- formatting


def fmt(value: Any, *, real: bool = False) -> str:
    """One number (or value) as it appears in the README. Whole floats print as integers (counts arrive as
    floats) unless ``real`` says the quantity is continuous, like a loss that happens to be 2.0."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        if not real and value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        if abs(value) >= 1000:
            return f"{value:.1f}"
        if abs(value) < 1e-3:
            return f"{value:.3g}"
        return f"{value:.4f}"
    return str(value)


def pct(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return fmt(value)
    return f"{value:+.2%}"


def _signed(value: float) -> str:
    return fmt(value, real=True) if not math.isfinite(value) or value < 0 else "+" + fmt(value, real=True)


def _real(value: Any) -> Any:
    """Mark a table value as continuous (see :func:`fmt`)."""
    return fmt(value, real=True) if isinstance(value, float) else value


def _cell(value: Any) -> str:
    """Safe inside a Markdown table cell."""
    text = value if isinstance(value, str) else fmt(value)
    return " ".join(text.split()).replace("|", "\\|") or " "


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def _jsonable(value: Any) -> Any:
    """Plain JSON: non-finite floats become null, numpy/torch scalars become numbers, enums their value."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items() if k not in ("logits", "labels") or not hasattr(v, "shape")}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "value") and isinstance(getattr(value, "value"), (str, int)):  # Enum
        return value.value
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # numpy / torch scalar
        return _jsonable(value.item())
    if hasattr(value, "tolist"):
        return _jsonable(value.tolist())
    return str(value)


def _flatten(value: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Dotted paths to the scalar leaves of a nested report (lists of scalars inline, other lists counted)."""
    if isinstance(value, Mapping):
        for k, v in value.items():
            yield from _flatten(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(value, (list, tuple)):
        if len(value) <= 10 and all(isinstance(v, (str, int, float, bool)) or v is None for v in value):
            yield prefix, ", ".join(fmt(v) for v in value) if value else "(none)"
        else:
            yield prefix, f"{len(value)} items"
    else:
        yield prefix, value


def _key_value_table(data: Mapping[str, Any] | None, what: str, see: str | None = None) -> list[str]:
    rows = [[f"`{k}`", v] for k, v in _flatten(_jsonable(dict(data or {})))]
    if not rows:
        return [f"No {what} was recorded."]
    lines = _table(["Item", "Value"], rows[:MAX_REPORT_ROWS])
    if len(rows) > MAX_REPORT_ROWS:
        lines.append(f"\n…and {len(rows) - MAX_REPORT_ROWS} more" + (f" in `{see}`." if see else "."))
    return lines


def _scalars(metrics: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if metrics is None:
        return None
    return {k: _jsonable(v) for k, v in metrics.items() if k not in NON_METRIC_KEYS and _is_number(v)}


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _metric_names(*evals: Mapping[str, Any] | None) -> list[str]:
    names = {k for e in evals if e for k, v in e.items() if k not in NON_METRIC_KEYS and _is_number(v)}
    ordered = [m for m in METRIC_ORDER if m in names]
    return ordered + sorted(names - set(ordered))


# --------------------------------------------------------------------------------------------- content


def primary_metric(spec: FineTuneJobSpec) -> tuple[str, str]:
    """The metric the card leads with: the early-stopping metric when set, else loss (LM) or macro F1."""
    es = spec.evaluation.early_stopping
    if es is not None:
        return es.metric, es.direction
    if spec.is_classification:
        return "f1_macro", "max"
    return "eval_loss", "min"


def _gains(reference: Mapping[str, Any] | None, compared: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Change from the reference baseline to the fine-tuned model on the same split, for every metric of known direction."""
    if not reference or not compared:
        return {}
    return {
        name: gain(reference, compared, name, METRIC_MODES[name])
        for name in _metric_names(reference, compared)
        if name in METRIC_MODES and name in reference and name in compared
    }


def _v(value: Any) -> Any:
    """An enum's value. The spec's ``use_enum_values`` does not apply to defaults, so fields left unset are still
    enum members (``str(Method.lora)`` is ``"Method.lora"``)."""
    return getattr(value, "value", value)


def label_names(spec: FineTuneJobSpec, data_report: Mapping[str, Any] | None) -> list[str] | None:
    """Class names from the spec, else the ones the data pipeline derived from the data."""
    if spec.model.labels:
        return list(spec.model.labels)
    classes = (data_report or {}).get("classes")
    labels = classes.get("labels") if isinstance(classes, Mapping) else None
    return [str(x) for x in labels] if isinstance(labels, (list, tuple)) else None


@dataclass(frozen=True)
class CardView:
    """A :class:`~.report.RunSummary` as the card reads it: the derived values computed once, for every section."""

    summary: RunSummary
    spec: FineTuneJobSpec
    classification: bool
    metric: str  # the metric the card leads with
    mode: str
    baseline: Mapping[str, Any] | None  # the BaselineReport (split, reference, one entry per baseline), None if not measured
    baselines: dict[str, Mapping[str, Any]]  # kind -> metrics, in BASELINES order
    baseline_split: str | None  # where every baseline was measured (test when there was a test set)
    reference: str | None  # the baseline the gains are measured from (what fine-tuning started from)
    final_eval: Mapping[str, Any]
    test_eval: Mapping[str, Any] | None
    compared: Mapping[str, Any] | None  # the fine-tuned model on baseline_split
    majority: Mapping[str, Any] | None  # always predicting the most frequent training class (classification)
    gains: dict[str, dict[str, Any]]
    per_class: Mapping[str, Mapping[str, Any]] | None
    hyper: dict[str, Any]
    adapter: dict[str, Any] | None

    @property
    def evaluated(self) -> Mapping[str, Any]:
        """The numbers the card stands on: test when there was a test set, else validation."""
        return self.test_eval or self.final_eval

    def baseline_title(self, kind: str) -> str:
        if kind == "k_shot" and self.baseline and self.baseline.get("k"):
            return f"{self.baseline['k']}-shot base model"
        return BASELINE_TITLES.get(kind, kind)


def card_view(summary: RunSummary) -> CardView:
    spec = summary.spec
    # Baselines written by an older trainer (a flat dict measured on validation, no split) are not comparable.
    baseline = summary.baseline if summary.baseline and isinstance(summary.baseline.get("split"), str) else None
    baselines = {kind: dict(baseline[kind]) for kind in BASELINES if baseline and isinstance(baseline.get(kind), Mapping)}
    split = baseline["split"] if baseline else None
    reference = baseline.get("reference") if baseline else None
    final_eval = summary.final_eval or {}
    compared = summary.test_eval if split == "test" else final_eval if split == "validation" else None
    metric, mode = primary_metric(spec)
    evaluated = summary.test_eval or final_eval
    return CardView(
        summary=summary, spec=spec, classification=spec.is_classification, metric=metric, mode=mode, baseline=baseline,
        baselines=baselines, baseline_split=split, reference=reference, final_eval=final_eval, test_eval=summary.test_eval,
        compared=compared, majority=baselines.get("majority_class"), gains=_gains(baselines.get(reference or ""), compared),
        per_class=evaluated.get("per_class") if spec.is_classification else None,
        hyper=spec.hyperparameters.model_dump(by_alias=True, mode="json"),
        adapter=spec.lora_or_default.model_dump(by_alias=True, mode="json") if spec.is_adapter else None,
    )


def limitations(v: CardView) -> list[str]:
    """What a reader must know before trusting the numbers: what was not measured, and what looked wrong."""
    notes = [
        "Evaluated only on held-out splits of the fine-tuning data; expect lower quality on data that differs "
        "from it in domain, style or time.",
    ]
    if v.classification:
        notes.append(
            "Predicts only the classes it was trained on; inputs outside them still get one of these labels, "
            "often with high confidence."
        )
    else:
        notes.append(
            "Loss and perplexity measure fit to reference text, not factual accuracy or safety: the model can "
            "produce fluent but wrong, biased or harmful text. Review outputs before relying on them."
        )
    if v.test_eval is None:
        notes.append(
            "No test-set evaluation was run: the numbers come from the validation set that also chose the best "
            "checkpoint, so they are optimistic."
        )
    notes += _measurement_notes(v)
    notes += _data_notes(v.spec)
    return notes


def _measurement_notes(v: CardView) -> list[str]:
    notes = []
    evaluated, majority, compared = v.evaluated, v.majority, v.compared or {}
    calibration, retention = v.summary.evaluation.calibration, v.summary.evaluation.retention
    n = evaluated.get("eval_samples")
    if v.classification and _is_number(n) and n < SMALL_EVAL_SET:
        notes.append(f"The evaluation set is small ({fmt(n)} examples): differences of a few points may be noise.")
    if v.baseline is None:
        notes.append("The baselines were not measured (evaluation.baseline is off), so the gain from fine-tuning is unknown.")
    elif v.baseline_split == "validation":
        notes.append(
            "There was no test set: the baselines and the gain are measured on the validation set that also chose the "
            "checkpoint, which flatters the fine-tuned model."
        )
    if majority and _is_number(compared.get("accuracy")) and _is_number(majority.get("accuracy")):
        if compared["accuracy"] <= majority["accuracy"]:
            notes.append(
                f"Accuracy ({fmt(compared['accuracy'])}) does not beat always predicting the most frequent class "
                f"({fmt(majority['accuracy'])}): the model has not learnt the task."
            )
    for kind in FAIR_BASELINES:
        fair, name = v.baselines.get(kind), ("accuracy" if v.classification else v.metric)
        if name not in METRIC_MODES or not fair or not _is_number(fair.get(name)) or not _is_number(compared.get(name)):
            continue
        if not gain(fair, compared, name, METRIC_MODES[name])["improved"]:
            notes.append(
                f"{metric_catalogue.title(name)} of the fine-tuned model ({fmt(compared[name], real=True)}) does not beat the "
                f"{v.baseline_title(kind).lower()} baseline ({fmt(fair[name], real=True)}): "
                + ("a logistic regression on the frozen base encoder does as well." if kind == "linear_probe"
                   else "prompting the base model with a few examples does as well.")
            )
    if v.classification and calibration is None:
        notes.append("Confidence scores were not calibrated (evaluation.calibration is off); do not read them as probabilities.")
    elif calibration is not None:
        ece_after = calibration.get("test_ece_after") if _is_number(calibration.get("test_ece_after")) else calibration.get("ece_after")
        if _is_number(ece_after) and ece_after > ECE_STILL_HIGH:
            notes.append(
                f"Even after temperature scaling the expected calibration error is {fmt(ece_after)}: "
                "confidence scores are only a rough guide."
            )
    if retention is None:
        notes.append("Catastrophic forgetting was not measured (no evaluation.retention dataset).")
    elif not retention.get("passed", True):
        notes.append(
            f"Retention check failed: loss on general data rose by {pct(retention.get('relative_increase'))} "
            f"(allowed {pct(retention.get('threshold'))}); the model has lost some general ability."
        )
    return notes


def _data_notes(spec: FineTuneJobSpec) -> list[str]:
    notes = []
    pre = spec.dataset.preprocessing
    if not pre.redact_pii:
        notes.append("PII redaction was off: the model may reproduce personal data from the training set.")
    else:
        missed = pii_coverage(pre.pii_regions)["not_looked_for"]
        notes.append(
            "PII redaction did not look for " + "; ".join(missed)
            + ": the model may reproduce any of these that the training data contains."
        )
    if _v(spec.dataset.leakage_check) in ("off", "warn"):
        notes.append(
            f"The train/evaluation leakage check was '{_v(spec.dataset.leakage_check)}': evaluation examples may also be "
            "in the training data, which would inflate the scores."
        )
    return notes


# ------------------------------------------------------------------------------------------------ build


def build_model_card(summary: RunSummary) -> tuple[dict[str, Any], str]:
    """``(model_card.json content, README.md text)`` of a finished run.

    ``summary.baseline`` is the run's ``BaselineReport`` (every baseline, measured on one split: test when there was
    one), ``summary.final_eval`` and ``summary.test_eval`` the validation and test metrics of the chosen checkpoint,
    as the evaluation module returns them. Gains compare the fine-tuned model with the reference baseline on the
    baselines' split.
    """
    from .crossval import card_markdown as cross_validation_markdown
    from .lineage import lineage_markdown
    from .readme import readme

    v = card_view(summary)
    spec = v.spec
    notes = limitations(v)
    card = {
        "schemaVersion": CARD_SCHEMA_VERSION,
        "jobName": summary.job,
        "baseModel": spec.model.uri,
        "task": _v(spec.model.task),
        "method": _v(spec.method),
        "objective": spec.objective.wire() if spec.objective is not None else None,
        "adapter": v.adapter,
        "labels": label_names(spec, summary.data_report) if v.classification else None,
        "dataset": spec.dataset.model_dump(by_alias=True, mode="json", exclude_none=True),
        "dataReport": _jsonable(summary.data_report or {}),
        "piiCoverage": pii_coverage(spec.dataset.preprocessing.pii_regions, enabled=spec.dataset.preprocessing.redact_pii),
        "hyperparameters": v.hyper,
        "training": _jsonable(summary.training()),
        "evaluation": {
            "primaryMetric": v.metric,
            "mode": v.mode,
            "baselineSplit": v.baseline_split,
            "gainFrom": v.reference,
            "baselines": {kind: _scalars(metrics) for kind, metrics in v.baselines.items()},
            "baselineDescriptions": {kind: BASELINES[kind] for kind in v.baselines},
            "kShot": {"k": v.baseline.get("k"), "trainRows": v.baseline.get("k_shot_train_rows")} if "k_shot" in v.baselines and v.baseline else None,
            "final": _scalars(v.final_eval),
            "test": _scalars(v.test_eval),
            "gain": _jsonable(v.gains),
            "perClass": _jsonable(v.per_class),
            "teacher": _jsonable(summary.evaluation.teacher),  # spec.distillation: the teacher on validation and test
        },
        "bestCheckpoint": _jsonable(summary.best_checkpoint),
        "calibration": _jsonable(summary.evaluation.calibration),
        "retention": _jsonable(summary.evaluation.retention),
        "limitations": notes,
        "lineage": _jsonable(summary.lineage),
        "crossValidation": _jsonable(summary.cross_validation),
    }
    json.dumps(card, allow_nan=False)  # fail here, not in the writer, if something slipped through
    return card, readme(v, notes) + lineage_markdown(summary.lineage) + cross_validation_markdown(summary.cross_validation)
