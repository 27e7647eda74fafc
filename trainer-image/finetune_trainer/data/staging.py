"""Staging: one input's files -> cleaned, deduplicated, tokenised rows in an Arrow file.

Rows stream through::

    read -> parse format -> normalise -> lowercase -> redact PII -> drop empty -> label conflicts
         -> exact dedupe -> near dedupe -> tokenise -> min/max tokens -> keep

and are written in batches to ``staged-<input>.arrow`` in the work folder (memory-mapped by
``datasets``), so the data never has to fit in RAM; the duplicate index (a hash and a 512-byte MinHash
signature per row) is the only global state. Besides the training columns a staged row carries what the
leakage check and the report need: ``_origin`` (file:line), ``_preview`` (the start of its comparison
key, cleaned and redacted), ``_hash`` and ``_sig`` (its key's hash and MinHash signature).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from finetune_api.spec import FineTuneJobSpec, PreprocessingSpec
from finetune_trainer.data import report as reports
from finetune_trainer.data.cleaning import NORMALIZERS, DuplicateIndex, dedupe_key, key_hash, signature
from finetune_trainer.data.formats import CLASSIFICATION, Record, content_text, is_empty, map_texts, parse_record
from finetune_trainer.data.labels import check_label
from finetune_trainer.data.pii import redact
from finetune_trainer.data.readers import Malformed, data_files, read_rows
from finetune_trainer.data.report import StepCounts
from finetune_trainer.data.tokenize import tokenize_batch
from finetune_trainer.errors import MalformedData
from finetune_trainer.storage import Storage

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

BATCH_ROWS = 512  # rows tokenised and written together
READ_BATCH = 1000  # rows read back per batch from Arrow

_STAGED_COMMON = [
    ("_origin", pa.string()),
    ("_preview", pa.string()),
    ("_hash", pa.binary()),
    ("_sig", pa.list_(pa.uint32())),
    ("_truncated", pa.bool_()),
]
ArrowValue = object  # one cell of a row appended to an ArrowSink (int list, str, bytes, bool, ...)


def wire_value(option: object) -> str:
    """An enum option's wire value (spec defaults are enum members, parsed values plain strings)."""
    return str(getattr(option, "value", option))


def arrow_batches(dataset: datasets.Dataset, columns: list[str]) -> Iterator[pa.Table]:
    """The dataset's rows in order as Arrow tables (follows a select()'s indices, no Python objects)."""
    yield from dataset.select_columns(columns).with_format("arrow").iter(batch_size=READ_BATCH)


class ArrowSink:
    """Append rows, written in record batches to an Arrow stream file; ``finish`` memory-maps it."""

    def __init__(self, path: Path, schema: pa.Schema):
        self.path = path
        self.schema = schema
        self.rows = 0
        self._tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        self._writer = pa.ipc.new_stream(str(self._tmp), schema)
        self._buffer: dict[str, list[ArrowValue]] = {name: [] for name in schema.names}

    def append(self, row: dict[str, ArrowValue]) -> None:
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


@dataclass
class PrepareContext:
    """What staging every input of one job needs, read once from the spec."""

    spec: FineTuneJobSpec
    storage: Storage
    tokenizer: PreTrainedTokenizerBase
    work_dir: Path
    fmt: str
    need_signatures: bool

    @property
    def pre(self) -> PreprocessingSpec:
        return self.spec.dataset.preprocessing


# ------------------------------------------------------------------------------ label conflicts


class LabelConflicts:
    """Classification rows whose text (dedupe key) was seen before with another label.

    Such rows are a data error, not duplicates: which label is right is unknown. Every conflicting row
    after the first is dropped as it streams by; ``preprocessing.labelConflicts`` then decides about the
    first one (``drop``: removed too, by :meth:`settle` once the input is staged; ``keepFirst``: kept) or
    fails the job (``fail``). Memory: one label per distinct text, classification only.
    """

    def __init__(self, policy: str):
        self.policy = policy
        self._first_label: dict[bytes, str] = {}
        self.conflicting: set[bytes] = set()

    def is_conflict(self, hash_: bytes, label: str, origin: str, preview: str, counts: StepCounts) -> bool:
        first = self._first_label.setdefault(hash_, label)
        if first == label:
            return False
        self.conflicting.add(hash_)
        counts.add_label_conflict(origin, [first, label], preview)
        return True

    def settle(self, staged: datasets.Dataset, counts: StepCounts, label_counts: Counter[str], name: str) -> datasets.Dataset:
        """Apply the policy once the whole input has streamed by."""
        if not self.conflicting:
            return staged
        if self.policy == "fail":
            first = counts.label_conflict_examples[0]
            raise MalformedData(
                f"{len(self.conflicting)} texts of {name} data {counts.uri} appear with different labels "
                f"({counts.label_conflicts} conflicting rows); e.g. row {first['row']} has label {first['labels'][1]!r} "
                f"where an earlier row with the same text has {first['labels'][0]!r}. Fix the labels, or set "
                "dataset.preprocessing.labelConflicts to drop (remove every such row) or keepFirst."
            )
        if self.policy == "drop":
            return self._drop_first_rows(staged, counts, label_counts)
        return staged

    def _drop_first_rows(self, staged: datasets.Dataset, counts: StepCounts, label_counts: Counter[str]) -> datasets.Dataset:
        """``staged`` without the kept rows of conflicting texts; their counts move to label_conflicts."""
        keep: list[int] = []
        position = 0
        for table in arrow_batches(staged, ["_hash", "input_ids", "label_name", "_truncated"]):
            lengths = pc.list_value_length(table["input_ids"]).to_pylist()
            rows = zip(table["_hash"].to_pylist(), lengths, table["label_name"].to_pylist(), table["_truncated"].to_pylist())
            for hash_, length, label, truncated in rows:
                if hash_ in self.conflicting:
                    counts.rows_kept -= 1
                    counts.label_conflicts += 1
                    counts.tokens -= length
                    counts.trainable_tokens -= length  # every classification token is trainable
                    counts.truncated -= int(truncated)
                    label_counts[label] -= 1
                else:
                    keep.append(position)
                position += 1
        for label in [name for name, n in label_counts.items() if n <= 0]:
            del label_counts[label]
        return staged.select(keep)


# ------------------------------------------------------------------------------------- staging


def _clean(record: Record, ctx: PrepareContext, counts: StepCounts) -> Record:
    normalizer = NORMALIZERS.get(wire_value(ctx.pre.normalize))
    if normalizer is not None:
        record = map_texts(record, normalizer)
    if ctx.pre.lowercase:
        record = map_texts(record, str.lower)
    if ctx.pre.redact_pii:
        record = map_texts(record, lambda text: redact(text, counts.pii))
    return record


def _records(ctx: PrepareContext, files: list[str], counts: StepCounts, known_labels: list[str] | None, label_where: str) -> Iterator[tuple[Record, str]]:
    """Parsed, cleaned records of one input's files (malformed rows counted and skipped)."""
    for item in read_rows(ctx.storage, counts.uri, ctx.work_dir, files):
        counts.rows_read += 1
        if isinstance(item, Malformed):
            raw = redact(item.raw) if ctx.pre.redact_pii else item.raw
            counts.add_malformed(item.origin, item.reason, raw)
            continue
        parsed = parse_record(item.data, ctx.fmt, ctx.spec.dataset.fields)
        if isinstance(parsed, str):
            raw = str(item.data)
            counts.add_malformed(item.origin, parsed, redact(raw) if ctx.pre.redact_pii else raw)
            continue
        if known_labels is not None:
            check_label(parsed["label"], known_labels, item.origin, label_where)
        yield _clean(parsed, ctx, counts), item.origin


@dataclass
class _Candidate:
    """A row that passed dedupe, waiting to be tokenised with its batch."""

    record: Record
    origin: str
    key: str
    hash_: bytes
    sig: np.ndarray | None


class _Stager:
    """One input's staging: the duplicate index, the counts and the Arrow sink, row by row."""

    def __init__(self, ctx: PrepareContext, name: str, uri: str, files: list[str]):
        self.ctx, self.name = ctx, name
        pre = ctx.pre
        self.counts = StepCounts(uri=uri, files=len(files))
        self.classification = ctx.fmt == CLASSIFICATION
        columns = [("input_ids", pa.list_(pa.int32()))]
        columns += [("label_name", pa.string())] if self.classification else [("labels", pa.list_(pa.int32()))]
        self.sink = ArrowSink(ctx.work_dir / f"staged-{name}.arrow", pa.schema(columns + _STAGED_COMMON))
        self.index = DuplicateIndex(pre.dedupe.near_threshold, near=pre.dedupe.near)
        self.conflicts = LabelConflicts(wire_value(pre.label_conflicts)) if self.classification else None
        self.label_counts: Counter[str] = Counter()
        self.pending: list[_Candidate] = []

    def offer(self, record: Record, origin: str) -> None:
        """Count the row at the first step that drops it, or queue it for tokenisation."""
        pre, counts = self.ctx.pre, self.counts
        if pre.drop_empty and is_empty(record):
            counts.empty += 1
            return
        key = dedupe_key(content_text(record))
        hash_ = key_hash(key)
        if self.conflicts is not None and self.conflicts.is_conflict(hash_, record["label"], origin, key, counts):
            return
        sig = signature(key) if self.ctx.need_signatures else None
        if pre.dedupe.exact and self.index.exact_match(hash_) is not None:
            counts.exact_duplicates += 1
            return
        if pre.dedupe.near and sig is not None and self.index.near_match(sig) is not None:
            counts.near_duplicates += 1
            return
        self.index.add(hash_, sig)
        self.pending.append(_Candidate(record, origin, key, hash_, sig))
        if len(self.pending) >= BATCH_ROWS:
            self.flush()

    def flush(self) -> None:
        """Tokenise the pending rows and keep those within the token limits."""
        pre, counts = self.ctx.pre, self.counts
        tokenized = tokenize_batch([c.record for c in self.pending], self.ctx.fmt, self.ctx.tokenizer, self.ctx.spec.hyperparameters.max_seq_length)
        for candidate, tok in zip(self.pending, tokenized):
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
                row: dict[str, ArrowValue] = {
                    "input_ids": tok.input_ids,
                    "_origin": candidate.origin,
                    "_preview": candidate.key[: reports.PREVIEW_CHARS],
                    "_hash": candidate.hash_,
                    "_sig": candidate.sig if candidate.sig is not None else [],
                    "_truncated": tok.truncated,
                }
                if self.classification:
                    row["label_name"] = candidate.record["label"]
                    self.label_counts[candidate.record["label"]] += 1
                else:
                    row["labels"] = tok.labels
                self.sink.append(row)
        self.pending.clear()

    def finish(self) -> datasets.Dataset:
        self.flush()
        staged = self.sink.finish()
        if self.conflicts is not None:
            staged = self.conflicts.settle(staged, self.counts, self.label_counts, self.name)
        return staged


def stage(ctx: PrepareContext, name: str, uri: str, known_labels: list[str] | None = None, label_where: str = "") -> tuple[datasets.Dataset, StepCounts, Counter[str]]:
    """Read, clean, dedupe and tokenise one input into a staged Arrow dataset (see the module docstring)."""
    files = data_files(ctx.storage, uri)
    stager = _Stager(ctx, name, uri, files)
    for record, origin in _records(ctx, files, stager.counts, known_labels, label_where):
        stager.offer(record, origin)
    stager.flush()
    counts, pre = stager.counts, ctx.pre
    if counts.rows_read and counts.malformed / counts.rows_read > pre.max_malformed_fraction:
        examples = "; ".join(f"{e['row']}: {e['reason']}" for e in counts.malformed_examples[:3])
        raise MalformedData(
            f"{counts.malformed} of {counts.rows_read} rows of {name} data {uri} could not be parsed as "
            f"format {ctx.fmt} ({counts.malformed / counts.rows_read:.1%}, allowed "
            f"{pre.max_malformed_fraction:.1%} by preprocessing.maxMalformedFraction). First: {examples}"
        )
    staged = stager.finish()
    log.info("data: %s: %d rows read, %d kept", name, counts.rows_read, counts.rows_kept)
    return staged, counts, stager.label_counts
