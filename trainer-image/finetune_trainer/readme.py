"""The model card's ``README.md``: one function per section, in the Hugging Face card order.

YAML front matter (``base_model``, ``library_name``, ``pipeline_tag``, ``tags``, ``model-index``), then the
title and headline, Model details, Training data (with the data report), Training procedure, Evaluation,
Calibration, Retention and Limitations. Every section reads the same :class:`~.model_card.CardView` and
returns its lines; :func:`readme` joins them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import yaml

from finetune_api.documents import BASELINES, DATA_REPORT_FILE
from finetune_api.spec import FineTuneJobSpec
from finetune_trainer.data.pii import coverage as pii_coverage

from .model_card import (
    COUNT_METRICS,
    MAX_REPORT_ROWS,
    METRIC_MODES,
    METRIC_TITLES,
    CardView,
    _is_number,
    _jsonable,
    _key_value_table,
    _metric_names,
    _real,
    _signed,
    _table,
    _v,
    fmt,
    label_names,
    pct,
)

METHOD_WORDS = {"full": "full fine-tuning", "lora": "LoRA", "qlora": "QLoRA (4-bit base)", "dora": "DoRA"}


def readme(v: CardView, limitations: list[str]) -> str:
    out = [_front_matter(v)]
    for section in (_title, _model_details, _training_data, _training_procedure, _evaluation, _distillation, _calibration, _retention):
        out += section(v)
    out += _limitations(v.summary.job, limitations)
    return "\n".join(out)


def _hub_id(uri: str) -> str:
    return uri[len("hf://") :] if uri.startswith("hf://") else uri


def _front_matter(v: CardView) -> str:
    spec, job_name = v.spec, v.summary.job
    results, split = v.evaluated, "test" if v.test_eval else "validation"
    pipeline = "text-classification" if v.classification else "text2text-generation" if spec.is_seq2seq else "text-generation"
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
        task = {"type": pipeline, "name": "Text classification" if v.classification else "Text-to-text generation" if spec.is_seq2seq else "Text generation"}
        dataset = {"name": f"{job_name} {split} split", "type": "custom", "split": split}
        meta["model-index"] = [{"name": job_name, "results": [{"task": task, "dataset": dataset, "metrics": metrics}]}]
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"


def _title(v: CardView) -> list[str]:
    spec = v.spec
    task_words = ("sequence classification" if v.classification else
                  "sequence-to-sequence generation (encoder-decoder)" if spec.is_seq2seq else "causal language modelling")
    out = [
        f"# {v.summary.job}",
        "",
        f"`{spec.model.uri}` fine-tuned for {task_words} with {METHOD_WORDS[_v(spec.method)]} by finetune-operator.",
    ]
    headline = v.evaluated.get(v.metric)
    if _is_number(headline):
        where = "test" if v.test_eval and v.metric in v.test_eval else "validation"
        line = f"{METRIC_TITLES.get(v.metric, v.metric)} on the {where} set: **{fmt(headline, real=True)}**"
        others = [f"{v.baseline_title(kind).lower()}: {fmt(metrics[v.metric], real=True)}"
                  for kind, metrics in v.baselines.items() if _is_number(metrics.get(v.metric))]
        if others and v.baseline_split == where:
            line += f" ({'; '.join(others)}; all on {where})"
        out += ["", line + "."]
    return out


def _model_details(v: CardView) -> list[str]:
    spec, adapter = v.spec, v.adapter
    details = [
        ["Base model", f"`{spec.model.uri}`"],
        ["Task", _v(spec.model.task)],
        ["Method", METHOD_WORDS[_v(spec.method)]],
    ]
    if spec.is_preference and spec.objective is not None:
        from .preference import objective_words

        details.append(["Objective", objective_words(spec)])
    if adapter:
        targets = adapter.get("targetModules") or ["architecture default"]
        details.append(
            ["Adapter", f"r={adapter['r']}, alpha={adapter['alpha']}, dropout={fmt(adapter['dropout'])}, "
             f"target modules: {', '.join(targets)}"]
        )
        details.append(["Merged copy written", fmt(spec.output.merge_adapter)])
    if v.classification:
        names = label_names(spec, v.summary.data_report)
        details.append(["Labels", ", ".join(names) if names else "taken from the data"])
    details.append(["Output", f"`{spec.output.uri}`"])
    return ["", "## Model details", "", *_table(["", ""], details)]


# What each preprocessing.normalize form does to the training text, in the card's words.
_NORMALISATION = {
    "safe": "safe Unicode normalisation (NFC, invisible/control characters and trailing spaces removed; indentation and symbols kept)",
    "aggressive": "aggressive Unicode normalisation (NFKC, whitespace runs collapsed)",
    "none": None,
}


def _leakage_key(spec: FineTuneJobSpec) -> str:
    """dataset.leakageKey, or what preference pairs are compared on (their prompt)."""
    if spec.is_preference:
        from .data.preference import leakage_key

        return leakage_key(_v(spec.dataset.leakage_key))
    return _v(spec.dataset.leakage_key)


def _training_data(v: CardView) -> list[str]:
    ds = v.spec.dataset
    sources = [["Train", f"`{ds.train}`"]]
    carved = "of train, split with seed {seed}" + (", stratified" if ds.split.stratify and v.classification else "")
    for name, given, fraction in (("Validation", ds.validation, ds.split.validation), ("Test", ds.test, ds.split.test)):
        carved_text = f"{fraction:.0%} " + carved.format(seed=ds.split.seed) if fraction else "none"
        sources.append([name, f"`{given}`" if given else carved_text])
    sources.append(["Format", _v(ds.format)])
    pre = ds.preprocessing
    cleaning = [
        _NORMALISATION.get(_v(pre.normalize)),
        "lower-casing" if pre.lowercase else None,
        f"exact dedupe (key: {_v(pre.dedupe.key)})" if pre.dedupe.exact else None,
        f"near-dedupe (Jaccard ≥ {fmt(pre.dedupe.near_threshold)}, key: {_v(pre.dedupe.key)})" if pre.dedupe.near else None,
        f"label conflicts: {_v(pre.label_conflicts)}" if v.classification else None,
        "PII redaction" if pre.redact_pii else None,
        "inverse-frequency class weights" if v.classification and pre.class_weights else None,
    ]
    sources.append(["Cleaning", ", ".join(c for c in cleaning if c) or "none"])
    coverage = pii_coverage(pre.pii_regions, enabled=pre.redact_pii)
    sources.append(["PII looked for", "; ".join(f"{i['kind']}: {i['what']}" for i in coverage["looked_for"]) or "nothing"])
    sources.append(["PII not looked for", "; ".join(coverage["not_looked_for"])])
    sources.append(["Leakage check (validation/test vs train, test vs validation, retention vs train)",
                    f"{_v(ds.leakage_check)} (key: {_leakage_key(v.spec)})"])
    out = ["", "## Training data", "", *_table(["", ""], sources)]
    return out + ["", "### Data report", "", *_data_report_lines(v.summary.data_report)]


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


def _training_procedure(v: CardView) -> list[str]:
    out = ["", "## Training procedure", "", "### Hyperparameters", ""]
    shown = dict(v.hyper)
    if shown.get("epochs") is None and shown.get("maxSteps") is None:
        shown["epochs"] = f"{fmt(v.spec.hyperparameters.total_epochs)} (default)"
    out += _table(["Hyperparameter", "Value"], [[f"`{k}`", value] for k, value in shown.items()])
    out += ["", "### Training run", ""]
    out += _key_value_table(v.summary.training(), "training summary")
    if v.summary.best_checkpoint:
        out += ["", "### Best checkpoint", ""]
        out += _key_value_table(v.summary.best_checkpoint, "best checkpoint")
    return out


def _evaluation(v: CardView) -> list[str]:
    baselines, final_eval, test_eval, split = v.baselines, v.final_eval, v.test_eval, v.baseline_split
    intro = "The fine-tuned model on the validation set (which chose the checkpoint)"
    if test_eval is not None:
        intro += " and on the held-out test set"
    if baselines:
        intro += f", beside every baseline, measured before training on the {split} set"
    intro += "."
    if v.summary.evaluation.calibration and test_eval is not None:
        intro += " The fine-tuned test loss and ECE are at the calibrated temperature (see Calibration); accuracy and F1 do not depend on it."
    if v.reference in baselines:
        intro += (f" Change is fine-tuned minus {v.baseline_title(v.reference).lower()}, both on the {split} set "
                  "(lower is better for loss, perplexity and ECE).")
    out = ["", "## Evaluation", "", intro, ""]
    header = ["Metric"] + [f"{v.baseline_title(kind)} ({split})" for kind in baselines]
    header += ["Fine-tuned (validation)", "Fine-tuned (test)"]
    if v.reference in baselines:
        header.append(f"Change vs {v.baseline_title(v.reference).lower()} ({split})")
    names = _metric_names(*baselines.values(), final_eval, test_eval)
    out += _table(header, [_evaluation_row(v, name) for name in names])
    if baselines:
        out += ["", "Baselines:", ""]
        out += [f"- **{v.baseline_title(kind)}** (`{kind}`): {BASELINES[kind]}" for kind in baselines]
        if "k_shot" in baselines and v.baseline and v.baseline.get("k_shot_train_rows") is not None:
            out.append(f"  The examples shown are training rows {', '.join(map(str, v.baseline['k_shot_train_rows']))}.")
        missing = [kind for kind in (("majority_class", "linear_probe") if v.classification else () if v.spec.is_seq2seq else ("k_shot",))
                   if kind not in baselines]
        if "k_shot" in missing:
            out += ["", "The k-shot baseline was not measured: it needs evaluation.metrics bleu or rouge, prompt-completion "
                    "or chat data and evaluation.fewShotExamples above 0."]
    else:
        out += ["", "No baseline was measured before training (evaluation.baseline is off)."]
    if test_eval is None:
        out += ["", "No test set was evaluated."]
    if v.per_class:
        out += ["", f"### Per class ({'test' if test_eval else 'validation'} set)", ""]
        out += _table(
            ["Class", "Precision", "Recall", "F1", "Support"],
            [[name, _real(s.get("precision")), _real(s.get("recall")), _real(s.get("f1")), s.get("support")]
             for name, s in v.per_class.items()],
        )
    return out


def _evaluation_row(v: CardView, name: str) -> list[Any]:
    show = (lambda value: value) if name in COUNT_METRICS else _real
    row: list[Any] = [METRIC_TITLES.get(name, f"`{name}`")]
    row += [show(metrics.get(name)) for metrics in v.baselines.values()]
    row.append(show(v.final_eval.get(name)))
    row.append(show(v.test_eval.get(name)) if v.test_eval is not None else None)
    if v.reference in v.baselines:
        g = v.gains.get(name)
        row.append("—" if g is None else f"{_signed(g['delta'])} ({pct(g['relative'])})")
    return row


def _distillation(v: CardView) -> list[str]:
    """spec.distillation: the teacher and the student side by side, on the same rows (none without distillation)."""
    teacher = v.summary.evaluation.teacher
    if not teacher:
        return []
    alpha, temperature = teacher.get("alpha"), teacher.get("temperature")
    intro = (f"Distilled from `{teacher.get('uri')}` (held in {teacher.get('precision')}, never trained): loss = "
             f"(1 - {alpha:g}) x task loss + {alpha:g} x T^2 x KL(teacher || student) on the logits softened by T = {temperature:g}. "
             "The teacher is measured once, on the student's validation and test rows, at T = 1 (uncalibrated).")
    if v.summary.evaluation.calibration and v.test_eval is not None:
        intro += " The student's test loss and ECE are at its calibrated temperature (see Calibration)."
    out = ["", "## Distillation", "", intro, ""]
    t_val, t_test = teacher.get("validation") or {}, teacher.get("test") or {}
    names = [n for n in _metric_names(t_val, t_test, v.final_eval, v.test_eval) if n != "per_class"]
    show = {n: ((lambda value: value) if n in COUNT_METRICS else _real) for n in names}
    rows = [[METRIC_TITLES.get(n, f"`{n}`"), show[n](t_val.get(n)), show[n](v.final_eval.get(n)),
             show[n](t_test.get(n)), show[n]((v.test_eval or {}).get(n))] for n in names]
    return out + _table(["Metric", "Teacher (validation)", "Student (validation)", "Teacher (test)", "Student (test)"], rows)


def _calibration(v: CardView) -> list[str]:
    calibration = v.summary.evaluation.calibration
    out = ["", "## Calibration", ""]
    if not calibration:
        if v.classification:
            return out + ["Not run (evaluation.calibration is off): the softmax scores are uncalibrated."]
        return out + ["Not applicable to causal language models."]
    out += [
        "Temperature scaling (Guo et al., 2017) divides the logits by one temperature fitted to minimise the "
        "validation negative log-likelihood; it changes confidence scores, never the predicted class. The "
        "validation rows are where the temperature was fitted (optimistic); the test rows are the honest measure.",
        "",
    ]
    rows = [
        ["ECE (15 bins), validation", _real(calibration.get("ece_before")), _real(calibration.get("ece_after"))],
        ["NLL, validation", _real(calibration.get("nll_before")), _real(calibration.get("nll_after"))],
    ]
    if _is_number(calibration.get("test_ece_before")):
        rows += [
            ["ECE (15 bins), test", _real(calibration.get("test_ece_before")), _real(calibration.get("test_ece_after"))],
            ["NLL, test", _real(calibration.get("test_nll_before")), _real(calibration.get("test_nll_after"))],
        ]
    out += _table(["", "Before (T = 1)", "After"], rows)
    out += ["", f"Temperature: **{fmt(calibration.get('temperature'), real=True)}** (apply as `softmax(logits / T)`)."]
    if not _is_number(calibration.get("test_ece_before")):
        out.append("No test set: the effect on held-out data was not measured.")
    return out


def _retention(v: CardView) -> list[str]:
    retention = v.summary.evaluation.retention
    out = ["", "## Retention (catastrophic forgetting)", ""]
    if not retention:
        return out + ["Not measured: no evaluation.retention dataset was configured."]
    verdict = "passed" if retention.get("passed") else "**failed**"
    out += ["Loss on general data, not used for training, before and after fine-tuning.", ""]
    out += _table(
        ["Loss before", "Loss after", "Relative increase", "Allowed", "Result"],
        [[_real(retention.get("loss_before")), _real(retention.get("loss_after")), pct(retention.get("relative_increase")),
          pct(retention.get("threshold")), verdict]],
    )
    return out


def _limitations(job_name: str, notes: list[str]) -> list[str]:
    out = ["", "## Limitations", ""]
    out += [f"- {note}" for note in notes]
    return out + ["", f"_Generated by finetune-operator for FineTuneJob `{job_name}`._", ""]
