"""The data pipeline from dataset URIs to tokenised, memory-mapped datasets, top to bottom.

Each input (train, then validation/test files, then retention) is *staged* (:mod:`.staging`: read,
cleaned, deduplicated and tokenised into a memory-mapped Arrow file in ``cache_dir``). Then: labels are resolved, validation/test are split from train when not given,
leakage of validation/test/retention from train and of test from validation is checked, and the final datasets are written with only the
columns the training loop needs.

Everything is deterministic: files are read in sorted order, the first of several duplicates is kept,
the split is seeded, MinHash permutations are seeded. The same inputs, spec and tokenizer give identical
datasets on every rank and after every restart.
"""

from __future__ import annotations

import logging
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from finetune_api.spec import FineTuneJobSpec
from finetune_api.status import DataSummary
from finetune_trainer.data import pii
from finetune_trainer.data import report as reports
from finetune_trainer.data.folds import Fold, plan_folds
from finetune_trainer.data.formats import CHAT, CLASSIFICATION
from finetune_trainer.data.labels import class_balance, inverse_frequency_weights, resolve_labels
from finetune_trainer.data.leakage import CHECKS, TRAIN_CHECKS, LeakageFindings, failure_message, run_checks
from finetune_trainer.data.report import StepCounts
from finetune_trainer.data.splits import split_indices
from finetune_trainer.data.staging import ArrowSink, PrepareContext, arrow_batches, stage, wire_value
from finetune_trainer.errors import EmptyDataset, InvalidConfig, LeakageDetected
from finetune_trainer.storage import Storage

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

LM_SCHEMA = pa.schema([("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32()))])
CLASSIFICATION_SCHEMA = pa.schema([("input_ids", pa.list_(pa.int32())), ("label", pa.int64())])
PREFERENCE_SCHEMA = pa.schema([(name, pa.list_(pa.int32())) for name in ("input_ids", "labels", "rejected_input_ids", "rejected_labels")])


@dataclass
class PreparedData:
    """What the training loop consumes. Datasets are memory-mapped Arrow files under ``cache_dir``."""

    train: datasets.Dataset  # LM: input_ids, labels; classification: input_ids, label
    validation: datasets.Dataset | None
    test: datasets.Dataset | None
    retention: datasets.Dataset | None  # from spec.evaluation.retention.dataset, same format as the job
    labels: list[str] | None  # classification label names in id order
    class_weights: list[float] | None
    report: dict[str, Any]  # the full data report (JSON-serialisable)
    folds: list[Fold] | None = None  # dataset.crossValidation: row indices into train (see data/folds.py)

    def summary(self, report_uri: str | None = None) -> DataSummary:
        return reports.summary(self.report, report_uri)


def _require_rows(dataset: datasets.Dataset, name: str, counts: StepCounts | None, why: str = "") -> None:
    if len(dataset) > 0:
        return
    detail = ""
    if counts is not None:
        dropped = ", ".join(f"{step.replace('_', ' ')} {getattr(counts, step)}" for step in reports.DROP_STEPS if getattr(counts, step))
        detail = f" ({counts.rows_read} rows read from {counts.uri}" + (f"; dropped: {dropped}" if dropped else "") + ")"
    raise EmptyDataset(f"no {name} rows left{why}{detail}. Check the data and dataset.preprocessing.")


# --------------------------------------------------------------------------------- final datasets


def _label_counts(dataset: datasets.Dataset) -> Counter[str]:
    out: Counter[str] = Counter()
    for table in arrow_batches(dataset, ["label_name"]):
        for item in pc.value_counts(table["label_name"]).to_pylist():
            out[item["values"]] += item["counts"]
    return out


def _finalise(staged: datasets.Dataset, path: Path, labels: list[str] | None) -> datasets.Dataset:
    """Write the training columns of ``staged`` (rows in order) to their own Arrow file."""
    if labels is None:
        schema = PREFERENCE_SCHEMA if "rejected_input_ids" in staged.column_names else LM_SCHEMA
        sink = ArrowSink(path, schema)
        for table in arrow_batches(staged, schema.names):
            sink.write_table(table)
    else:
        sink = ArrowSink(path, CLASSIFICATION_SCHEMA)
        names = pa.array(labels, type=pa.string())
        for table in arrow_batches(staged, ["input_ids", "label_name"]):
            label = pc.index_in(table["label_name"], value_set=names)  # every name was checked against labels
            sink.write_table(pa.table({"input_ids": table["input_ids"], "label": label}))
    return sink.finish()


# ------------------------------------------------------------------------------------ the steps


@dataclass
class _Splits:
    """The job's datasets as preparation goes (staged columns until :func:`_finalise`)."""

    train: datasets.Dataset
    validation: datasets.Dataset | None = None
    test: datasets.Dataset | None = None
    retention: datasets.Dataset | None = None

    def items(self) -> list[tuple[str, datasets.Dataset | None]]:
        return [("train", self.train), ("validation", self.validation), ("test", self.test), ("retention", self.retention)]


def _check_tokenizer(fmt: str, tokenizer: PreTrainedTokenizerBase) -> None:
    if fmt == CHAT and not getattr(tokenizer, "chat_template", None):
        raise InvalidConfig(
            "dataset.format chat needs a tokenizer with a chat template, and the base model's tokenizer has none. "
            "Use a chat/instruct model, or format the data as prompt-completion."
        )


def _split_from_train(spec: FineTuneJobSpec, splits: _Splits, labels: list[str] | None) -> dict[str, Any]:
    """Carve the validation/test sets that were not given as files out of train; returns the split report."""
    dspec = spec.dataset
    split_info: dict[str, Any] = {"method": "files" if (dspec.validation or dspec.test) else "none"}
    val_fraction = 0.0 if dspec.validation or dspec.cross_validation else dspec.split.validation  # cross-validation: folds instead
    test_fraction = 0.0 if dspec.test else dspec.split.test
    if val_fraction <= 0 and test_fraction <= 0:
        return split_info
    stratify = None
    if labels is not None and dspec.split.stratify:
        names = pa.array(labels, type=pa.string())
        stratify = np.concatenate(
            [pc.index_in(t["label_name"], value_set=names).to_numpy(zero_copy_only=False) for t in arrow_batches(splits.train, ["label_name"])]
        )
    try:
        plan = split_indices(len(splits.train), validation=val_fraction, test=test_fraction, seed=dspec.split.seed, stratify_labels=stratify)
    except ValueError as exc:
        raise EmptyDataset(
            f"{len(splits.train)} training rows are too few to split off validation {val_fraction} and test {test_fraction} ({exc}). "
            "Add data, lower dataset.split, or give dataset.validation/test files."
        ) from None
    pool = splits.train
    splits.train = pool.select(plan.train)
    if plan.validation is not None:
        splits.validation = pool.select(plan.validation)
    if plan.test is not None:
        splits.test = pool.select(plan.test)
    _require_rows(splits.train, "training", None, " after the validation/test split")
    return {**plan.info, "given_files": [s for s in ("validation", "test") if getattr(dspec, s)]}


def _leakage_step(spec: FineTuneJobSpec, splits: _Splits, policy: str) -> dict[str, Any]:
    """Run the leakage checks and apply ``dataset.leakageCheck``; returns the leakage report."""
    leakage: dict[str, Any] = {"policy": policy}
    if policy == "off":
        return leakage
    leakage["key"] = wire_value(spec.dataset.leakage_key)
    if wire_value(spec.dataset.format) == "preference":
        from finetune_trainer.data.preference import leakage_key

        leakage["key"] = leakage_key(leakage["key"])
    findings = run_checks(dict(splits.items()), spec.dataset.preprocessing.dedupe.near_threshold)
    for name, found in findings.items():
        leakage[name] = found.as_report()
    leakage["total"] = sum(f.total for n, f in findings.items() if n in TRAIN_CHECKS)
    leakage["all_checks_total"] = sum(f.total for f in findings.values())
    if policy == "fail" and leakage["all_checks_total"]:
        raise LeakageDetected(failure_message(findings))
    if policy == "drop":
        _drop_leaked(splits, findings, leakage)
    if policy == "warn" and leakage["all_checks_total"]:
        log.warning("data: %d evaluation examples also appear in train or validation (leakageCheck warn)", leakage["all_checks_total"])
    return leakage


def _drop_leaked(splits: _Splits, findings: dict[str, LeakageFindings], leakage: dict[str, Any]) -> None:
    """Remove the leaked rows from each evaluated split (test: those found in train or in validation)."""
    for split_name in ("validation", "test", "retention"):
        checks = [name for name, evaluated, _ in CHECKS if evaluated == split_name and findings.get(name) and findings[name].leaked_rows]
        if not checks:
            continue
        for name in checks:
            leakage[name]["dropped"] = len(findings[name].leaked_rows)
        leaked = np.unique(np.concatenate([np.asarray(findings[name].leaked_rows) for name in checks]))
        evaluation = getattr(splits, split_name)
        evaluation = evaluation.select(np.setdiff1d(np.arange(len(evaluation)), leaked))
        _require_rows(evaluation, split_name, None, " after dropping the examples found in train or validation (leakageCheck drop)")
        setattr(splits, split_name, evaluation)


def _classes_step(spec: FineTuneJobSpec, splits: _Splits, labels: list[str], label_source: str | None) -> tuple[dict[str, Any], list[float] | None]:
    """The class report (counts per split, imbalance) and the class weights when asked for."""
    train_counts = _label_counts(splits.train)
    classes: dict[str, Any] = {"labels": labels, "source": label_source, "train": class_balance(train_counts, labels)}
    for name, evaluation in (("validation", splits.validation), ("test", splits.test)):
        if evaluation is not None:
            classes[name] = class_balance(_label_counts(evaluation), labels)
    class_weights = None
    if spec.dataset.preprocessing.class_weights:
        class_weights = inverse_frequency_weights(train_counts, labels)
        classes["class_weights"] = class_weights
    return classes, class_weights


def _folds_step(spec: FineTuneJobSpec, splits: _Splits, labels: list[str] | None, policy: str) -> tuple[list[Fold], dict[str, Any]]:
    """dataset.crossValidation: the folds of the training rows (the test split is already out), leakage-checked per fold."""
    cv = spec.dataset.cross_validation
    assert cv is not None
    stratify = None
    if labels is not None and cv.stratify:
        names = pa.array(labels, type=pa.string())
        stratify = np.concatenate(
            [pc.index_in(t["label_name"], value_set=names).to_numpy(zero_copy_only=False) for t in arrow_batches(splits.train, ["label_name"])]
        )
    return plan_folds(splits.train, folds=cv.folds, seed=spec.dataset.split.seed, stratify_labels=stratify, policy=policy,
                      near_threshold=spec.dataset.preprocessing.dedupe.near_threshold)


# ------------------------------------------------------------------------------------ the entry


def prepare_data(spec: FineTuneJobSpec, storage: Storage, tokenizer: PreTrainedTokenizerBase, *, cache_dir: Path | None = None) -> PreparedData:
    """Read, clean, split, check and tokenise the job's data. Raises TrainerErrors for user-caused failures."""
    dspec = spec.dataset
    pre = dspec.preprocessing
    fmt = wire_value(dspec.format)
    leakage_policy = wire_value(dspec.leakage_check)
    _check_tokenizer(fmt, tokenizer)
    if cache_dir is not None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
    work_dir = Path(tempfile.mkdtemp(prefix="data-", dir=cache_dir))
    ctx = PrepareContext(spec, storage, tokenizer, work_dir, fmt, need_signatures=leakage_policy != "off")

    # 1. Train, then the label set (spec's, else the train data's).
    spec_labels = list(spec.model.labels) if spec.model.labels else None
    train, train_counts, train_label_counts = stage(ctx, "train", dspec.train, spec_labels, "in model.labels")
    inputs: dict[str, StepCounts] = {"train": train_counts}
    _require_rows(train, "training", train_counts)
    splits = _Splits(train)
    labels: list[str] | None = None
    label_source = None
    if fmt == CLASSIFICATION:
        labels, label_source = resolve_labels(spec_labels, spec.model.num_labels, set(train_label_counts))
    where = "in model.labels" if label_source == "spec" else "found in the training data"

    # 2. Validation and test files, when given; 3. what was not given, split from train.
    for name, uri in (("validation", dspec.validation), ("test", dspec.test)):
        if uri:
            staged, inputs[name], _ = stage(ctx, name, uri, labels, where)
            _require_rows(staged, name, inputs[name])
            setattr(splits, name, staged)
    split_info = _split_from_train(spec, splits, labels)

    # 4. Retention data for the forgetting check, cleaned the same way.
    if spec.evaluation.retention is not None:
        splits.retention, inputs["retention"], _ = stage(ctx, "retention", spec.evaluation.retention.dataset, labels, where)
        _require_rows(splits.retention, "retention", inputs["retention"])

    # 5. Leakage: validation/test/retention against train, test against validation.
    leakage = _leakage_step(spec, splits, leakage_policy)
    folds, cv_report = _folds_step(spec, splits, labels, leakage_policy) if dspec.cross_validation else (None, None)

    # 6. Classes, then the final datasets with only the training columns.
    classes, class_weights = _classes_step(spec, splits, labels, label_source) if labels is not None else (None, None)
    final = {name: _finalise(staged, work_dir / f"{name}.arrow", labels) if staged is not None else None for name, staged in splits.items()}
    for staged_file in work_dir.glob("staged-*.arrow"):  # the final files hold everything still needed
        staged_file.unlink()

    input_reports = {name: counts.as_dict() for name, counts in inputs.items()}
    report = {
        "format": fmt,
        "task": wire_value(spec.model.task),
        "max_seq_length": spec.hyperparameters.max_seq_length,
        "preprocessing": pre.wire(),
        "pii_coverage": pii.coverage(pre.pii_regions, enabled=pre.redact_pii),
        "inputs": input_reports,
        "total": reports.totals([r for name, r in input_reports.items() if name != "retention"]),
        "split": split_info,
        "leakage": leakage,
        "classes": classes,
        "final_sizes": {name: (len(d) if d is not None else None) for name, d in final.items()},
    }
    if cv_report is not None:
        report["cross_validation"] = cv_report
    return PreparedData(
        train=final["train"],
        validation=final["validation"],
        test=final["test"],
        retention=final["retention"],
        labels=labels,
        class_weights=class_weights,
        report=report,
        folds=folds,
    )
