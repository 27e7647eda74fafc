"""The data pipeline from dataset URIs to tokenised, memory-mapped datasets, top to bottom.

For each input (train, then validation/test files, then retention) rows stream through::

    read -> parse format -> normalise -> lowercase -> redact PII -> drop empty
         -> exact dedupe -> near dedupe -> tokenise -> min/max tokens -> keep

and are written in batches to an Arrow file in ``cache_dir`` (memory-mapped by ``datasets``), so the data
never has to fit in RAM; the duplicate index (a hash and a 512-byte MinHash signature per row) is the
only global state. Then: labels are resolved, validation/test are split from train when not given,
leakage between train and validation/test is checked, and the final datasets are written with only the
columns the training loop needs.

Everything is deterministic: files are read in sorted order, the first of several duplicates is kept,
the split is seeded, MinHash permutations are seeded. The same inputs, spec and tokenizer give identical
datasets on every rank and after every restart.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from finetune_api.spec import FineTuneJobSpec
from finetune_api.status import DataSummary
from finetune_trainer.data import report as reports
from finetune_trainer.data.cleaning import DuplicateIndex, dedupe_key, key_hash, normalize_text, signature
from finetune_trainer.data.formats import CHAT, CLASSIFICATION, Record, content_text, is_empty, map_texts, parse_record
from finetune_trainer.data.labels import check_label, class_balance, inverse_frequency_weights, resolve_labels
from finetune_trainer.data.leakage import build_train_index, find_leakage
from finetune_trainer.data.pii import redact
from finetune_trainer.data.readers import Malformed, data_files, read_rows
from finetune_trainer.data.report import StepCounts
from finetune_trainer.data.splits import split_indices
from finetune_trainer.data.tokenize import tokenize_batch
from finetune_trainer.errors import EmptyDataset, InvalidConfig, LeakageDetected, MalformedData
from finetune_trainer.storage import Storage

log = logging.getLogger(__name__)

BATCH_ROWS = 512  # rows tokenised and written together
READ_BATCH = 1000  # rows read back per batch from Arrow

_STAGED_COMMON = [
    ("_origin", pa.string()),
    ("_preview", pa.string()),
    ("_hash", pa.binary()),
    ("_sig", pa.list_(pa.uint32())),
]
LM_SCHEMA = pa.schema([("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32()))])
CLASSIFICATION_SCHEMA = pa.schema([("input_ids", pa.list_(pa.int32())), ("label", pa.int64())])


@dataclass
class PreparedData:
    """What the training loop consumes. Datasets are memory-mapped Arrow files under ``cache_dir``."""

    train: datasets.Dataset  # LM: input_ids, labels; classification: input_ids, label
    validation: datasets.Dataset | None
    test: datasets.Dataset | None
    retention: datasets.Dataset | None  # from spec.evaluation.retention.dataset, same format as the job
    labels: list[str] | None  # classification label names in id order
    class_weights: list[float] | None
    report: dict  # the full data report (JSON-serialisable)

    def summary(self, report_uri: str | None = None) -> DataSummary:
        return reports.summary(self.report, report_uri)


# ----------------------------------------------------------------------------------- arrow files


class _ArrowSink:
    """Append rows, written in record batches to an Arrow stream file; ``finish`` memory-maps it."""

    def __init__(self, path: Path, schema: pa.Schema):
        self.path = path
        self.schema = schema
        self.rows = 0
        self._tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        self._writer = pa.ipc.new_stream(str(self._tmp), schema)
        self._buffer: dict[str, list[Any]] = {name: [] for name in schema.names}

    def append(self, row: dict[str, Any]) -> None:
        for name in self.schema.names:
            self._buffer[name].append(row[name])
        self.rows += 1
        if len(self._buffer[self.schema.names[0]]) >= BATCH_ROWS:
            self._flush()

    def write_table(self, table: pa.Table) -> None:
        """Append rows already in Arrow form (no Python round trip)."""
        self._flush()
        for batch in table.select(self.schema.names).cast(self.schema).to_batches():
            self._writer.write_batch(batch)
        self.rows += table.num_rows

    def _flush(self) -> None:
        if self._buffer[self.schema.names[0]]:
            self._writer.write_batch(pa.record_batch(self._buffer, schema=self.schema))
            self._buffer = {name: [] for name in self.schema.names}

    def finish(self) -> datasets.Dataset:
        self._flush()
        self._writer.close()
        os.replace(self._tmp, self.path)
        return datasets.Dataset.from_file(str(self.path))


# ------------------------------------------------------------------------------------- staging


@dataclass
class _Job:
    """Everything one input's staging needs, read once from the spec."""

    spec: FineTuneJobSpec
    storage: Storage
    tokenizer: Any
    work_dir: Path
    fmt: str
    need_signatures: bool

    @property
    def pre(self) -> Any:
        return self.spec.dataset.preprocessing


def _clean(record: Record, job: _Job, counts: StepCounts) -> Record:
    if job.pre.normalize:
        record = map_texts(record, normalize_text)
    if job.pre.lowercase:
        record = map_texts(record, str.lower)
    if job.pre.redact_pii:
        record = map_texts(record, lambda text: redact(text, counts.pii))
    return record


def _rows(job: _Job, files: list[str], counts: StepCounts, known_labels: list[str] | None, label_where: str) -> Iterator[tuple[Record, str]]:
    """Parsed, cleaned records of one input's files (malformed rows counted and skipped)."""
    for item in read_rows(job.storage, counts.uri, job.work_dir, files):
        counts.rows_read += 1
        if isinstance(item, Malformed):
            raw = redact(item.raw) if job.pre.redact_pii else item.raw
            counts.add_malformed(item.origin, item.reason, raw)
            continue
        parsed = parse_record(item.data, job.fmt, job.spec.dataset.fields)
        if isinstance(parsed, str):
            raw = str(item.data)
            counts.add_malformed(item.origin, parsed, redact(raw) if job.pre.redact_pii else raw)
            continue
        if known_labels is not None:
            check_label(parsed["label"], known_labels, item.origin, label_where)
        yield _clean(parsed, job, counts), item.origin


def _stage(job: _Job, name: str, uri: str, known_labels: list[str] | None = None, label_where: str = "") -> tuple[datasets.Dataset, StepCounts, Counter[str]]:
    """Read, clean, dedupe and tokenise one input into a staged Arrow dataset.

    Staged columns: the training columns (input_ids + labels, or input_ids + label_name) and, for the
    leakage check and the report, _origin (file:line), _preview, _hash and _sig (the MinHash signature).
    """
    pre = job.pre
    files = data_files(job.storage, uri)
    counts = StepCounts(uri=uri, files=len(files))
    classification = job.fmt == CLASSIFICATION
    train_columns = [("input_ids", pa.list_(pa.int32()))]
    train_columns += [("label_name", pa.string())] if classification else [("labels", pa.list_(pa.int32()))]
    sink = _ArrowSink(job.work_dir / f"staged-{name}.arrow", pa.schema(train_columns + _STAGED_COMMON))
    index = DuplicateIndex(pre.dedupe.near_threshold, near=pre.dedupe.near)
    label_counts: Counter[str] = Counter()
    max_len = job.spec.hyperparameters.max_seq_length
    pending: list[tuple[Record, str, str, bytes, np.ndarray | None]] = []

    def flush() -> None:
        tokenized = tokenize_batch([p[0] for p in pending], job.fmt, job.tokenizer, max_len)
        for (record, origin, key, hash_, sig), tok in zip(pending, tokenized):
            if tok.length < pre.min_tokens:
                counts.too_short += 1
            elif pre.max_tokens is not None and tok.length > pre.max_tokens:
                counts.too_long += 1
            elif tok.trainable == 0:
                counts.no_trainable_tokens += 1
            else:
                counts.rows_kept += 1
                counts.truncated += tok.truncated
                counts.tokens += len(tok.input_ids)
                counts.trainable_tokens += tok.trainable
                row = {
                    "input_ids": tok.input_ids,
                    "_origin": origin,
                    "_preview": key[: reports.PREVIEW_CHARS],
                    "_hash": hash_,
                    "_sig": sig if sig is not None else [],
                }
                if classification:
                    row["label_name"] = record["label"]
                    label_counts[record["label"]] += 1
                else:
                    row["labels"] = tok.labels
                sink.append(row)
        pending.clear()

    for record, origin in _rows(job, files, counts, known_labels, label_where):
        if pre.drop_empty and is_empty(record):
            counts.empty += 1
            continue
        key = dedupe_key(content_text(record))
        hash_ = key_hash(key)
        sig = signature(key) if job.need_signatures else None
        if pre.dedupe.exact and index.exact_match(hash_) is not None:
            counts.exact_duplicates += 1
            continue
        if pre.dedupe.near and index.near_match(sig) is not None:  # type: ignore[arg-type]
            counts.near_duplicates += 1
            continue
        index.add(hash_, sig)
        pending.append((record, origin, key, hash_, sig))
        if len(pending) >= BATCH_ROWS:
            flush()
    flush()

    if counts.rows_read and counts.malformed / counts.rows_read > pre.max_malformed_fraction:
        examples = "; ".join(f"{e['row']}: {e['reason']}" for e in counts.malformed_examples[:3])
        raise MalformedData(
            f"{counts.malformed} of {counts.rows_read} rows of {name} data {uri} could not be parsed as "
            f"format {job.fmt} ({counts.malformed / counts.rows_read:.1%}, allowed "
            f"{pre.max_malformed_fraction:.1%} by preprocessing.maxMalformedFraction). First: {examples}"
        )
    log.info("data: %s: %d rows read, %d kept", name, counts.rows_read, counts.rows_kept)
    return sink.finish(), counts, label_counts


def _require_rows(dataset: datasets.Dataset, name: str, counts: StepCounts | None, why: str = "") -> None:
    if len(dataset) > 0:
        return
    detail = ""
    if counts is not None:
        dropped = ", ".join(f"{step.replace('_', ' ')} {getattr(counts, step)}" for step in reports.DROP_STEPS if getattr(counts, step))
        detail = f" ({counts.rows_read} rows read from {counts.uri}" + (f"; dropped: {dropped}" if dropped else "") + ")"
    raise EmptyDataset(f"no {name} rows left{why}{detail}. Check the data and dataset.preprocessing.")


# --------------------------------------------------------------------------------- final datasets


def _arrow_batches(dataset: datasets.Dataset, columns: list[str]) -> Iterator[pa.Table]:
    """The dataset's rows in order as Arrow tables (follows a select()'s indices, no Python objects)."""
    yield from dataset.select_columns(columns).with_format("arrow").iter(batch_size=READ_BATCH)


def _label_counts(dataset: datasets.Dataset) -> Counter[str]:
    out: Counter[str] = Counter()
    for table in _arrow_batches(dataset, ["label_name"]):
        for item in pc.value_counts(table["label_name"]).to_pylist():
            out[item["values"]] += item["counts"]
    return out


def _finalise(staged: datasets.Dataset, path: Path, labels: list[str] | None) -> datasets.Dataset:
    """Write the training columns of ``staged`` (rows in order) to their own Arrow file."""
    if labels is None:
        sink = _ArrowSink(path, LM_SCHEMA)
        for table in _arrow_batches(staged, ["input_ids", "labels"]):
            sink.write_table(table)
    else:
        sink = _ArrowSink(path, CLASSIFICATION_SCHEMA)
        names = pa.array(labels, type=pa.string())
        for table in _arrow_batches(staged, ["input_ids", "label_name"]):
            label = pc.index_in(table["label_name"], value_set=names)  # every name was checked against labels
            sink.write_table(pa.table({"input_ids": table["input_ids"], "label": label}))
    return sink.finish()


# ------------------------------------------------------------------------------------ the entry


def _value(option: Any) -> str:
    """An enum option's wire value (spec defaults are enum members, parsed values plain strings)."""
    return str(getattr(option, "value", option))


def prepare_data(spec: FineTuneJobSpec, storage: Storage, tokenizer: Any, *, cache_dir: Path | None = None) -> PreparedData:
    """Read, clean, split, check and tokenise the job's data. Raises TrainerErrors for user-caused failures."""
    dspec = spec.dataset
    pre = dspec.preprocessing
    fmt = _value(dspec.format)
    leakage_policy = _value(dspec.leakage_check)
    classification = fmt == CLASSIFICATION
    if fmt == CHAT and not getattr(tokenizer, "chat_template", None):
        raise InvalidConfig(
            "dataset.format chat needs a tokenizer with a chat template, and the base model's tokenizer has none. "
            "Use a chat/instruct model, or format the data as prompt-completion."
        )
    if cache_dir is not None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
    work_dir = Path(tempfile.mkdtemp(prefix="data-", dir=cache_dir))
    job = _Job(
        spec=spec,
        storage=storage,
        tokenizer=tokenizer,
        work_dir=work_dir,
        fmt=fmt,
        need_signatures=pre.dedupe.near or leakage_policy != "off",
    )

    # 1. Train, then the label set (spec's, else the train data's).
    spec_labels = list(spec.model.labels) if spec.model.labels else None
    train, train_counts, train_label_counts = _stage(job, "train", dspec.train, spec_labels, "in model.labels")
    inputs: dict[str, StepCounts] = {"train": train_counts}
    _require_rows(train, "training", train_counts)
    labels: list[str] | None = None
    label_source = None
    if classification:
        labels, label_source = resolve_labels(spec_labels, spec.model.num_labels, set(train_label_counts))
    where = "in model.labels" if label_source == "spec" else "found in the training data"

    # 2. Validation and test files, when given.
    validation = test = None
    if dspec.validation:
        validation, inputs["validation"], _ = _stage(job, "validation", dspec.validation, labels, where)
        _require_rows(validation, "validation", inputs["validation"])
    if dspec.test:
        test, inputs["test"], _ = _stage(job, "test", dspec.test, labels, where)
        _require_rows(test, "test", inputs["test"])

    # 3. Split what was not given from train.
    split_info: dict[str, Any] = {"method": "files" if (dspec.validation or dspec.test) else "none"}
    val_fraction = 0.0 if dspec.validation else dspec.split.validation
    test_fraction = 0.0 if dspec.test else dspec.split.test
    if val_fraction > 0 or test_fraction > 0:
        stratify = None
        if classification and dspec.split.stratify:
            assert labels is not None
            names = pa.array(labels, type=pa.string())
            stratify = np.concatenate(
                [pc.index_in(t["label_name"], value_set=names).to_numpy(zero_copy_only=False) for t in _arrow_batches(train, ["label_name"])]
            )
        try:
            plan = split_indices(len(train), validation=val_fraction, test=test_fraction, seed=dspec.split.seed, stratify_labels=stratify)
        except ValueError as exc:
            raise EmptyDataset(
                f"{len(train)} training rows are too few to split off validation {val_fraction} and test {test_fraction} ({exc}). "
                "Add data, lower dataset.split, or give dataset.validation/test files."
            ) from None
        split_info = {**plan.info, "given_files": [s for s in ("validation", "test") if getattr(dspec, s)]}
        pool = train
        train = pool.select(plan.train)
        if plan.validation is not None:
            validation = pool.select(plan.validation)
        if plan.test is not None:
            test = pool.select(plan.test)
        _require_rows(train, "training", None, " after the validation/test split")

    # 4. Leakage between train and the evaluation splits.
    leakage: dict[str, Any] = {"policy": leakage_policy}
    if leakage_policy != "off":
        index = build_train_index(train, pre.dedupe.near_threshold)
        findings = {}
        for name, evaluation in (("validation", validation), ("test", test)):
            if evaluation is not None:
                findings[name] = find_leakage(index, evaluation, train, name)
                leakage[name] = findings[name].as_report()
        leakage["total"] = sum(f.total for f in findings.values())
        if leakage_policy == "fail" and leakage["total"]:
            counts = ", ".join(f"{n}: {f.exact} exact, {f.near} near" for n, f in findings.items() if f.total)
            first = next(e for f in findings.values() for e in f.examples)
            raise LeakageDetected(
                f"{leakage['total']} validation/test examples also appear in train ({counts}); e.g. {first['row']} "
                f"matches train row {first['train_row']} ({first['match']}). Remove them from the data, or set "
                "dataset.leakageCheck to drop (remove them from validation/test) or warn."
            )
        if leakage_policy == "drop":
            for name, found in findings.items():
                if found.leaked_rows:
                    evaluation = validation if name == "validation" else test
                    assert evaluation is not None
                    keep = np.setdiff1d(np.arange(len(evaluation)), np.asarray(found.leaked_rows))
                    evaluation = evaluation.select(keep)
                    _require_rows(evaluation, name, None, " after dropping the examples leaked from train (leakageCheck drop)")
                    if name == "validation":
                        validation = evaluation
                    else:
                        test = evaluation
                    leakage[name]["dropped"] = len(found.leaked_rows)
        if leakage_policy == "warn" and leakage["total"]:
            log.warning("data: %d validation/test examples also appear in train (leakageCheck warn)", leakage["total"])

    # 5. Retention data for the forgetting check, cleaned the same way.
    retention = None
    if spec.evaluation.retention is not None:
        retention, inputs["retention"], _ = _stage(job, "retention", spec.evaluation.retention.dataset, labels, where)
        _require_rows(retention, "retention", inputs["retention"])

    # 6. Classes, then the final datasets with only the training columns.
    classes = None
    class_weights = None
    if classification:
        assert labels is not None
        train_counts_final = _label_counts(train)
        classes = {"labels": labels, "source": label_source, "train": class_balance(train_counts_final, labels)}
        for name, evaluation in (("validation", validation), ("test", test)):
            if evaluation is not None:
                classes[name] = class_balance(_label_counts(evaluation), labels)
        if pre.class_weights:
            class_weights = inverse_frequency_weights(train_counts_final, labels)
            classes["class_weights"] = class_weights

    final = {
        name: _finalise(staged, work_dir / f"{name}.arrow", labels) if staged is not None else None
        for name, staged in (("train", train), ("validation", validation), ("test", test), ("retention", retention))
    }

    for staged_file in work_dir.glob("staged-*.arrow"):  # the final files hold everything still needed
        staged_file.unlink()

    input_reports = {name: counts.as_dict() for name, counts in inputs.items()}
    report = {
        "format": fmt,
        "task": _value(spec.model.task),
        "max_seq_length": spec.hyperparameters.max_seq_length,
        "preprocessing": pre.wire(),
        "inputs": input_reports,
        "total": reports.totals([r for name, r in input_reports.items() if name != "retention"]),
        "split": split_info,
        "leakage": leakage,
        "classes": classes,
        "final_sizes": {name: (len(d) if d is not None else None) for name, d in final.items()},
    }
    return PreparedData(
        train=final["train"],
        validation=final["validation"],
        test=final["test"],
        retention=final["retention"],
        labels=labels,
        class_weights=class_weights,
        report=report,
    )
