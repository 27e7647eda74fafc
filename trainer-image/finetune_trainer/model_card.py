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
from typing import Any

import yaml

from finetune_api import metric_catalogue
from finetune_api.documents import DATA_REPORT_FILE
from finetune_api.spec import FineTuneJobSpec
from finetune_trainer.evaluate import gain

CARD_SCHEMA_VERSION = 1

# From the one metric table: which way is better (gains are judged only for these), titles and order.
METRIC_MODES = {m.name: m.direction for m in metric_catalogue.METRICS if m.direction is not None}
METRIC_TITLES = {m.name: m.title for m in metric_catalogue.METRICS}
METRIC_ORDER = [m.name for m in metric_catalogue.METRICS]
COUNT_METRICS = {m.name for m in metric_catalogue.METRICS if m.direction is None}
# Never copied into the card: tensors evaluate_classification returns on request.
NON_METRIC_KEYS = {"per_class", "logits", "labels", "majority"}
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


def _data_report_lines(report: Mapping[str, Any] | None) -> list[str]:
    """The data pipeline's report (data/prepare.py) summarised: split sizes, what cleaning removed, leakage found,
    class balance. A report of another shape is shown flattened."""
    report = _jsonable(dict(report or {}))
    sizes, total = report.get("final_sizes"), report.get("total")
    if not isinstance(sizes, dict) or not isinstance(total, dict):
        return _key_value_table(report, "data report", see=DATA_REPORT_FILE)
    lines = _table(["Split", "Rows after cleaning"], [[name, n] for name, n in sizes.items() if n is not None])
    titles = {"pii_total": "PII redacted"}
    counts = [[titles.get(k, k.replace("_", " ").capitalize()), v] for k, v in total.items() if _is_number(v)]
    pii = total.get("pii")
    if isinstance(pii, dict) and pii:
        counts.append(["PII redacted by kind", ", ".join(f"{kind} {n}" for kind, n in pii.items())])
    if counts:
        lines += ["", "Cleaning, summed over the job's inputs (each row counted at the first step that dropped it):", ""]
        lines += _table(["Step", "Rows / tokens"], counts)
    leakage = report.get("leakage")
    if isinstance(leakage, dict) and leakage.get("policy") not in (None, "off"):
        found = [
            f"{split}: {fmt(leakage[split].get('exact'))} exact, {fmt(leakage[split].get('near'))} near"
            for split in ("validation", "test")
            if isinstance(leakage.get(split), dict)
        ]
        lines += ["", f"Leakage check ({leakage['policy']}): " + ("; ".join(found) if found else "nothing found") + "."]
    classes = report.get("classes")
    train_balance = classes.get("train") if isinstance(classes, dict) else None
    if isinstance(train_balance, dict) and isinstance(train_balance.get("counts"), dict):
        lines += ["", "Training examples per class:", ""]
        lines += _table(["Class", "Examples"], list(map(list, train_balance["counts"].items()))[:MAX_REPORT_ROWS])
        if _is_number(train_balance.get("imbalance_ratio")):
            lines += ["", f"Imbalance ratio (largest / smallest class): {fmt(train_balance['imbalance_ratio'], real=True)}."]
    lines += ["", f"The full report is in `{DATA_REPORT_FILE}`."]
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


def _gains(baseline: Mapping[str, Any] | None, final: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Change from the base model to the fine-tuned one on validation, for every metric of known direction."""
    if not baseline:
        return {}
    return {
        name: gain(baseline, final, name, METRIC_MODES[name])
        for name in _metric_names(baseline, final)
        if name in METRIC_MODES and name in baseline and name in final
    }


def _v(value: Any) -> Any:
    """An enum's value. The spec's ``use_enum_values`` does not apply to defaults, so fields left unset are still
    enum members (``str(Method.lora)`` is ``"Method.lora"``)."""
    return getattr(value, "value", value)


def _label_names(spec: FineTuneJobSpec, data_report: Mapping[str, Any] | None) -> list[str] | None:
    """Class names from the spec, else the ones the data pipeline derived from the data."""
    if spec.model.labels:
        return list(spec.model.labels)
    classes = (data_report or {}).get("classes")
    labels = classes.get("labels") if isinstance(classes, Mapping) else None
    return [str(x) for x in labels] if isinstance(labels, (list, tuple)) else None


def _hub_id(uri: str) -> str:
    return uri[len("hf://") :] if uri.startswith("hf://") else uri


def _limitations(
    spec: FineTuneJobSpec,
    baseline: Mapping[str, Any] | None,
    final_eval: Mapping[str, Any],
    test_eval: Mapping[str, Any] | None,
    calibration: Mapping[str, Any] | None,
    retention: Mapping[str, Any] | None,
    majority: Mapping[str, Any] | None,
) -> list[str]:
    classification = spec.is_classification
    notes = [
        "Evaluated only on held-out splits of the fine-tuning data; expect lower quality on data that differs "
        "from it in domain, style or time.",
    ]
    if classification:
        notes.append(
            "Predicts only the classes it was trained on; inputs outside them still get one of these labels, "
            "often with high confidence."
        )
    else:
        notes.append(
            "Loss and perplexity measure fit to reference text, not factual accuracy or safety: the model can "
            "produce fluent but wrong, biased or harmful text. Review outputs before relying on them."
        )
    if test_eval is None:
        notes.append(
            "No test-set evaluation was run: the numbers come from the validation set that also chose the best "
            "checkpoint, so they are optimistic."
        )
    evaluated = test_eval or final_eval
    n = evaluated.get("eval_samples")
    if classification and _is_number(n) and n < SMALL_EVAL_SET:
        notes.append(f"The evaluation set is small ({fmt(n)} examples): differences of a few points may be noise.")
    if baseline is None:
        notes.append("The base model was not evaluated (evaluation.baseline is off), so the gain from fine-tuning is unknown.")
    if majority and "accuracy" in evaluated and _is_number(majority.get("accuracy")):
        if evaluated["accuracy"] <= majority["accuracy"]:
            notes.append(
                f"Accuracy ({fmt(evaluated['accuracy'])}) does not beat always predicting the most frequent class "
                f"({fmt(majority['accuracy'])}): the model has not learnt the task."
            )
    if classification and calibration is None:
        notes.append("Confidence scores were not calibrated (evaluation.calibration is off); do not read them as probabilities.")
    elif calibration is not None and _is_number(calibration.get("ece_after")) and calibration["ece_after"] > ECE_STILL_HIGH:
        notes.append(
            f"Even after temperature scaling the expected calibration error is {fmt(calibration['ece_after'])}: "
            "confidence scores are only a rough guide."
        )
    if retention is None:
        notes.append("Catastrophic forgetting was not measured (no evaluation.retention dataset).")
    elif not retention.get("passed", True):
        notes.append(
            f"Retention check failed: loss on general data rose by {pct(retention.get('relative_increase'))} "
            f"(allowed {pct(retention.get('threshold'))}); the model has lost some general ability."
        )
    pre = spec.dataset.preprocessing
    if not pre.redact_pii:
        notes.append("PII redaction was off: the model may reproduce personal data from the training set.")
    if _v(spec.dataset.leakage_check) in ("off", "warn"):
        notes.append(
            f"The train/evaluation leakage check was '{_v(spec.dataset.leakage_check)}': evaluation examples may also be "
            "in the training data, which would inflate the scores."
        )
    return notes


# ------------------------------------------------------------------------------------------------ build


def build_model_card(
    *,
    job_name: str,
    spec: FineTuneJobSpec,
    data_report: dict,
    baseline: dict | None,
    final_eval: dict,
    test_eval: dict | None,
    calibration: dict | None,
    retention: dict | None,
    best_checkpoint: dict | str | None,
    training: dict,
    majority_baseline: dict | None = None,
) -> tuple[dict, str]:
    """``(model_card.json content, README.md text)``.

    ``best_checkpoint`` is a dict (step, metric, uri, ...) or just its URI. The majority-class baseline is taken
    from ``majority_baseline`` or, failing that, from ``baseline["majority"]``.

    ``baseline`` and ``final_eval`` are validation metrics of the base and the fine-tuned model, ``test_eval`` the
    test metrics of the best checkpoint, as returned by the evaluation module. ``majority_baseline`` (optional,
    classification) is :func:`finetune_trainer.evaluate.majority_baseline` on the evaluated split.
    """
    if isinstance(best_checkpoint, str):
        best_checkpoint = {"uri": best_checkpoint}
    if majority_baseline is None and baseline and isinstance(baseline.get("majority"), Mapping):
        majority_baseline = dict(baseline["majority"])
    classification = spec.is_classification
    metric, mode = primary_metric(spec)
    gains = _gains(baseline, final_eval)
    evaluated = test_eval or final_eval
    per_class = evaluated.get("per_class") if classification else None
    limitations = _limitations(spec, baseline, final_eval, test_eval, calibration, retention, majority_baseline)
    hyper = spec.hyperparameters.model_dump(by_alias=True, mode="json")
    adapter = spec.lora_or_default.model_dump(by_alias=True, mode="json") if spec.is_adapter else None

    card = {
        "schemaVersion": CARD_SCHEMA_VERSION,
        "jobName": job_name,
        "baseModel": spec.model.uri,
        "task": _v(spec.model.task),
        "method": _v(spec.method),
        "adapter": adapter,
        "labels": _label_names(spec, data_report) if classification else None,
        "dataset": spec.dataset.model_dump(by_alias=True, mode="json", exclude_none=True),
        "dataReport": _jsonable(data_report or {}),
        "hyperparameters": hyper,
        "training": _jsonable(training or {}),
        "evaluation": {
            "primaryMetric": metric,
            "mode": mode,
            "baseline": _scalars(baseline),
            "final": _scalars(final_eval),
            "test": _scalars(test_eval),
            "majorityBaseline": _scalars(majority_baseline),
            "gain": _jsonable(gains),
            "perClass": _jsonable(per_class),
        },
        "bestCheckpoint": _jsonable(best_checkpoint),
        "calibration": _jsonable(calibration),
        "retention": _jsonable(retention),
        "limitations": limitations,
    }
    json.dumps(card, allow_nan=False)  # fail here, not in the writer, if something slipped through

    readme = _readme(
        job_name=job_name,
        spec=spec,
        classification=classification,
        metric=metric,
        data_report=data_report,
        baseline=baseline,
        final_eval=final_eval,
        test_eval=test_eval,
        majority=majority_baseline,
        gains=gains,
        per_class=per_class,
        calibration=calibration,
        retention=retention,
        best_checkpoint=best_checkpoint,
        training=training,
        hyper=hyper,
        adapter=adapter,
        limitations=limitations,
    )
    return card, readme


def _front_matter(job_name: str, spec: FineTuneJobSpec, classification: bool, results: Mapping[str, Any], split: str) -> str:
    pipeline = "text-classification" if classification else "text-generation"
    meta: dict[str, Any] = {
        "base_model": _hub_id(spec.model.uri),
        "library_name": "peft" if spec.is_adapter else "transformers",
        "pipeline_tag": pipeline,
        "tags": ["finetune-operator", str(_v(spec.method)), str(_v(spec.model.task))] + (["peft"] if spec.is_adapter else []),
    }
    metrics = [
        {"type": name, "value": float(results[name]), "name": f"{split.capitalize()} {METRIC_TITLES.get(name, name)}"}
        for name in _metric_names(results)
        if name in METRIC_MODES and math.isfinite(float(results[name]))
    ]
    if metrics:
        meta["model-index"] = [
            {
                "name": job_name,
                "results": [
                    {
                        "task": {"type": pipeline, "name": "Text classification" if classification else "Text generation"},
                        "dataset": {"name": f"{job_name} {split} split", "type": "custom", "split": split},
                        "metrics": metrics,
                    }
                ],
            }
        ]
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"


def _readme(
    *,
    job_name: str,
    spec: FineTuneJobSpec,
    classification: bool,
    metric: str,
    data_report: Mapping[str, Any] | None,
    baseline: Mapping[str, Any] | None,
    final_eval: Mapping[str, Any],
    test_eval: Mapping[str, Any] | None,
    majority: Mapping[str, Any] | None,
    gains: Mapping[str, Mapping[str, Any]],
    per_class: Mapping[str, Mapping[str, Any]] | None,
    calibration: Mapping[str, Any] | None,
    retention: Mapping[str, Any] | None,
    best_checkpoint: Mapping[str, Any] | None,
    training: Mapping[str, Any] | None,
    hyper: Mapping[str, Any],
    adapter: Mapping[str, Any] | None,
    limitations: list[str],
) -> str:
    ds = spec.dataset
    method_words = {"full": "full fine-tuning", "lora": "LoRA", "qlora": "QLoRA (4-bit base)", "dora": "DoRA"}
    task_words = "sequence classification" if classification else "causal language modelling"
    out: list[str] = [
        _front_matter(job_name, spec, classification, test_eval or final_eval, "test" if test_eval else "validation"),
        f"# {job_name}",
        "",
        f"`{spec.model.uri}` fine-tuned for {task_words} with {method_words[_v(spec.method)]} "
        "by finetune-operator.",
    ]
    headline = (test_eval or final_eval).get(metric)
    if _is_number(headline):
        where = "test" if test_eval and metric in test_eval else "validation"
        line = f"{METRIC_TITLES.get(metric, metric)} on the {where} set: **{fmt(headline, real=True)}**"
        if metric in gains:
            line += f" (base model: {fmt(gains[metric]['baseline'], real=True)} on validation)"
        out += ["", line + "."]

    # Model details
    out += ["", "## Model details", ""]
    details = [
        ["Base model", f"`{spec.model.uri}`"],
        ["Task", _v(spec.model.task)],
        ["Method", method_words[_v(spec.method)]],
    ]
    if adapter:
        targets = adapter.get("targetModules") or ["architecture default"]
        details.append(
            ["Adapter", f"r={adapter['r']}, alpha={adapter['alpha']}, dropout={fmt(adapter['dropout'])}, "
             f"target modules: {', '.join(targets)}"]
        )
        details.append(["Merged copy written", fmt(spec.output.merge_adapter)])
    if classification:
        names = _label_names(spec, data_report)
        details.append(["Labels", ", ".join(names) if names else "taken from the data"])
    details.append(["Output", f"`{spec.output.uri}`"])
    out += _table(["", ""], details)

    # Training data
    out += ["", "## Training data", ""]
    sources = [["Train", f"`{ds.train}`"]]
    carved = "of train, split with seed {seed}" + (", stratified" if ds.split.stratify and classification else "")
    for name, given, fraction in (("Validation", ds.validation, ds.split.validation), ("Test", ds.test, ds.split.test)):
        carved_text = f"{fraction:.0%} " + carved.format(seed=ds.split.seed) if fraction else "none"
        sources.append([name, f"`{given}`" if given else carved_text])
    sources.append(["Format", _v(ds.format)])
    pre = ds.preprocessing
    cleaning = [
        "Unicode NFKC normalisation" if pre.normalize else None,
        "lower-casing" if pre.lowercase else None,
        "exact dedupe" if pre.dedupe.exact else None,
        f"near-dedupe (Jaccard ≥ {fmt(pre.dedupe.near_threshold)})" if pre.dedupe.near else None,
        "PII redaction" if pre.redact_pii else None,
        "inverse-frequency class weights" if classification and pre.class_weights else None,
    ]
    sources.append(["Cleaning", ", ".join(c for c in cleaning if c) or "none"])
    sources.append(["Leakage check (train vs validation/test)", _v(ds.leakage_check)])
    out += _table(["", ""], sources)
    out += ["", "### Data report", ""]
    out += _data_report_lines(data_report)

    # Training procedure
    out += ["", "## Training procedure", "", "### Hyperparameters", ""]
    shown = dict(hyper)
    if shown.get("epochs") is None and shown.get("maxSteps") is None:
        shown["epochs"] = f"{fmt(spec.hyperparameters.total_epochs)} (default)"
    out += _table(["Hyperparameter", "Value"], [[f"`{k}`", v] for k, v in shown.items()])
    out += ["", "### Training run", ""]
    out += _key_value_table(training, "training summary")
    if best_checkpoint:
        out += ["", "### Best checkpoint", ""]
        out += _key_value_table(best_checkpoint, "best checkpoint")

    # Evaluation
    out += ["", "## Evaluation", ""]
    intro = "The fine-tuned model on the validation set"
    if baseline is not None:
        intro += ", next to the base model before training"
    if test_eval is not None:
        intro += "; the chosen checkpoint on the held-out test set"
    intro += "."
    if baseline is not None:
        intro += " Change is fine-tuned minus base (lower is better for loss, perplexity and ECE)."
    out += [intro, ""]
    header = ["Metric"]
    if baseline is not None:
        header.append("Base model (validation)")
    if majority is not None:
        header.append("Majority class")
    header.append("Fine-tuned (validation)")
    if baseline is not None:
        header.append("Change")
    header.append("Test")
    rows = []
    for name in _metric_names(baseline, final_eval, test_eval):
        show = (lambda v: v) if name in COUNT_METRICS else _real
        row: list[Any] = [METRIC_TITLES.get(name, f"`{name}`")]
        if baseline is not None:
            row.append(show(baseline.get(name)))
        if majority is not None:
            row.append(show(majority.get(name)))
        row.append(show(final_eval.get(name)))
        if baseline is not None:
            g = gains.get(name)
            row.append("—" if g is None else f"{_signed(g['delta'])} ({pct(g['relative'])})")
        row.append(show(test_eval.get(name)) if test_eval is not None else None)
        rows.append(row)
    out += _table(header, rows)
    if baseline is None:
        out += ["", "The base model was not evaluated before training (evaluation.baseline is off)."]
    if test_eval is None:
        out += ["", "No test set was evaluated."]
    if per_class:
        out += ["", f"### Per class ({'test' if test_eval else 'validation'} set)", ""]
        out += _table(
            ["Class", "Precision", "Recall", "F1", "Support"],
            [[name, _real(s.get("precision")), _real(s.get("recall")), _real(s.get("f1")), s.get("support")]
             for name, s in per_class.items()],
        )

    # Calibration
    out += ["", "## Calibration", ""]
    if calibration:
        out += [
            "Temperature scaling (Guo et al., 2017) divides the logits by one temperature fitted to minimise the "
            "validation negative log-likelihood; it changes confidence scores, never the predicted class. Measured "
            "on the validation set the temperature was fitted on.",
            "",
        ]
        out += _table(
            ["", "Before", "After"],
            [
                ["ECE (15 bins)", _real(calibration.get("ece_before")), _real(calibration.get("ece_after"))],
                ["NLL", _real(calibration.get("nll_before")), _real(calibration.get("nll_after"))],
            ],
        )
        out += ["", f"Temperature: **{fmt(calibration.get('temperature'), real=True)}** (apply as `softmax(logits / T)`)."]
        if test_eval is not None and _is_number(test_eval.get("ece")):
            out.append(f"Test-set ECE as evaluated: {fmt(test_eval['ece'], real=True)}.")
    elif classification:
        out += ["Not run (evaluation.calibration is off): the softmax scores are uncalibrated."]
    else:
        out += ["Not applicable to causal language models."]

    # Retention
    out += ["", "## Retention (catastrophic forgetting)", ""]
    if retention:
        verdict = "passed" if retention.get("passed") else "**failed**"
        out += [
            "Loss on general data, not used for training, before and after fine-tuning.",
            "",
        ]
        out += _table(
            ["Loss before", "Loss after", "Relative increase", "Allowed", "Result"],
            [[_real(retention.get("loss_before")), _real(retention.get("loss_after")), pct(retention.get("relative_increase")),
              pct(retention.get("threshold")), verdict]],
        )
    else:
        out += ["Not measured: no evaluation.retention dataset was configured."]

    # Limitations
    out += ["", "## Limitations", ""]
    out += [f"- {note}" for note in limitations]
    out += ["", f"_Generated by finetune-operator for FineTuneJob `{job_name}`._", ""]
    return "\n".join(out)
