"""Staging: one input's files -> cleaned, deduplicated, tokenised rows in an Arrow file.

Rows stream through::

    read -> parse format -> NFKC expansion cap -> normalise -> redact PII -> lowercase -> drop empty
         -> label conflicts -> exact dedupe -> near dedupe -> tokenise -> min/max tokens -> keep

(reading within ``dataset.limits``, see :mod:`.limits`; a row that NFKC would make more than
``maxNormalizationExpansion`` times longer is counted as malformed before anything normalises it)

and are written in batches to ``staged-<input>.arrow`` in the work folder (memory-mapped by
``datasets``), so the data never has to fit in RAM. The per-row work (normalise, redact, keys, hashes,
MinHash signatures, tokenisation: :func:`clean_batch`) is done a chunk of :data:`CHUNK_ROWS` rows at a time,
by forked worker processes when there are several CPUs (:func:`cleaned_chunks`, at most two chunks per
worker in flight, results taken in order, so the output does not depend on the number of workers); this
process reads and parses, then takes the rows of each
chunk in order through label conflicts and dedupe, which depend on the rows before. The duplicate index
(per row a hash and LSH band keys in numpy arrays, the 512-byte MinHash signature spilled to a temporary
file, see :class:`~.cleaning.DuplicateIndex`) and the label-conflict hashes are the only global state.
A row dropped as a duplicate or a label conflict was tokenised for nothing (a few per cent of rows; cheaper
than a second pass). Besides the training columns a staged row carries what the
leakage check and the report need: ``_origin`` (file:line), ``_preview`` (the start of its leakage key,
cleaned and redacted), ``_hash`` and ``_sig`` (the leakage key's hash and MinHash signature).

Two keys (:func:`~finetune_trainer.data.formats.key_text`): ``preprocessing.dedupe.key`` for dedupe
within the input and ``dataset.leakageKey`` for the leakage checks between splits; when both name the
same part the key is computed once. Every row that enters the duplicate index also goes, as origin and
preview, to ``index-<input>.arrow`` (row id = position), so each duplicate example in the report can
show the row it duplicates.
"""

from __future__ import annotations

import array
import itertools
import logging
import multiprocessing
import os
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Sequence

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from finetune_api.spec import FineTuneJobSpec, PreprocessingSpec
from finetune_trainer.data import report as reports
from finetune_trainer.data.cleaning import EXACT, NEAR, NORMALIZERS, DuplicateIndex, dedupe_key, hash_words, key_hash, nfkc_expansion, signatures
from finetune_trainer.data import preference
from finetune_trainer.data.formats import CLASSIFICATION, PREFERENCE, Record, columns, is_empty, key_text, map_texts, parse_record, texts
from finetune_trainer.data.labels import check_label
from finetune_trainer.data.pii import lower_keeping_placeholders, redact
from finetune_trainer.data.readers import Malformed, data_files, read_rows
from finetune_trainer.data.report import StepCounts
from finetune_trainer.data.tokenize import Tokenized, tokenize_batch
from finetune_trainer.errors import MalformedData
from finetune_trainer.storage import Storage

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

BATCH_ROWS = 512  # rows tokenised and written together
READ_BATCH = 1000  # rows read back per batch from Arrow
CHUNK_ROWS = 1024  # rows cleaned, keyed and MinHashed together, by a worker process when there are several CPUs
MAX_WORKERS = 8

_INDEX_ROWS = pa.schema([("origin", pa.string()), ("preview", pa.string())])
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
        """Append rows already in Arrow form (no Python round trip), as one record batch: rows gathered through a
        select()'s indices come as one chunk per row, and a file of one-row batches costs an object per row to open."""
        self._flush()
        for batch in table.select(self.schema.names).cast(self.schema).combine_chunks().to_batches():
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
    need_signatures: bool  # stage each row's leakage-key MinHash signature (the leakage check is on)

    @property
    def pre(self) -> PreprocessingSpec:
        return self.spec.dataset.preprocessing


# ------------------------------------------------------------------------------ label conflicts


class LabelConflicts:
    """Classification rows whose text (dedupe key) was seen before with another label.

    Such rows are a data error, not duplicates: which label is right is unknown. Every conflicting row
    after the first is dropped as it streams by; ``preprocessing.labelConflicts`` then decides about the
    first one (``drop``: removed too, by :meth:`settle` once the input is staged; ``keepFirst``: kept) or
    fails the job (``fail``). Memory: per distinct text its key hash and first label's number in numpy arrays
    (about 30 bytes; no Python object per text), classification only.
    """

    def __init__(self, policy: str):
        self.policy = policy
        self._seen = DuplicateIndex(1.0, near=False)  # row id = position in _first
        self._first = array.array("i")  # the label number of each distinct text's first row
        self._numbers: dict[str, int] = {}
        self._names: list[str] = []
        self.conflicting: set[bytes] = set()

    def conflicts(self, hashes: list[bytes], labels: list[str], origins: list[str], previews: list[str], counts: StepCounts) -> list[bool]:
        """For each row in order: does its text appear earlier (in this input) with another label? Counts each such row."""
        kind, matched, _ = self._seen.match(hash_words(hashes), None)
        new: dict[bytes, int] = {}  # texts first seen in this batch -> label number
        out = []
        for i, (hash_, label) in enumerate(zip(hashes, labels)):
            number = self._numbers.setdefault(label, len(self._numbers))
            if number == len(self._names):
                self._names.append(label)
            first = self._first[int(matched[i])] if kind[i] == EXACT else new.setdefault(hash_, number)
            if first == number:
                out.append(False)
                continue
            self.conflicting.add(hash_)
            counts.add_label_conflict(origins[i], [self._names[first], label], previews[i])
            out.append(True)
        if new:
            self._seen.add_batch(hash_words(list(new)), None)
            self._first.extend(new.values())
        return out

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
        """``staged`` without the kept rows of conflicting texts; their counts move to label_conflicts.

        The staged ``_hash`` is the leakage key's; for classification every key is the row's one text,
        so it equals the dedupe key's hash that :meth:`is_conflict` recorded."""
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


def dedupe_batch(index: DuplicateIndex, hashes: np.ndarray, sigs: np.ndarray | None, exact: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:meth:`DuplicateIndex.dedupe` (a function here so the benchmark can time the dedupe stage)."""
    return index.dedupe(hashes, sigs, exact)



@dataclass(frozen=True)
class RowWork:
    """What the per-row work of a chunk needs from the spec (plain values, so a worker process gets it cheaply)."""

    normalize: str
    redact_pii: bool
    pii_regions: tuple[str, ...]
    lowercase: bool
    dedupe_key: str
    leakage_key: str
    near: bool  # near dedupe: the dedupe key's signature
    leak_signatures: bool  # the leakage check: the leakage key's signature
    drop_empty: bool
    fmt: str
    max_seq_length: int
    seq2seq: bool

    @classmethod
    def of(cls, ctx: PrepareContext) -> RowWork:
        pre = ctx.pre
        leakage_key = wire_value(ctx.spec.dataset.leakage_key)
        if ctx.fmt == PREFERENCE:  # a pair's prompt is what must not leak (see preference.leakage_key)
            leakage_key = preference.leakage_key(leakage_key)
        return cls(wire_value(pre.normalize), pre.redact_pii, tuple(pre.pii_regions), pre.lowercase, wire_value(pre.dedupe.key),
                   leakage_key, pre.dedupe.near, ctx.need_signatures, pre.drop_empty, ctx.fmt, ctx.spec.hyperparameters.max_seq_length, ctx.spec.is_seq2seq)


def _clean(record: Record, work: RowWork, pii_counts: Counter[str]) -> Record:
    normalizer = NORMALIZERS.get(work.normalize)
    if normalizer is not None:
        record = map_texts(record, normalizer)
    if work.redact_pii:  # before lowercasing: key, token, IBAN and identity-number formats are case-sensitive
        regions = work.pii_regions
        record = map_texts(record, lambda text: redact(text, pii_counts, regions))
        if work.lowercase:
            record = map_texts(record, lower_keeping_placeholders)
    elif work.lowercase:
        record = map_texts(record, str.lower)
    return record


@dataclass
class Chunk:
    """Rows after the per-row work (:func:`clean_batch`): cleaned records and their keys, hashes and signatures."""

    records: list[Record]
    origins: list[str]
    pii: Counter[str]  # PII spans replaced in these rows, by kind
    empty: list[bool]
    keys: list[str]  # dedupe keys
    hashes: list[bytes]
    leaks: list[str]  # leakage keys
    leak_hashes: list[bytes]
    sigs: np.ndarray | None  # the dedupe keys' MinHash signatures (near dedupe on)
    leak_sigs: np.ndarray | None  # the leakage keys' (leakage check on)
    tokens: list[Tokenized | preference.PairTokenized | None]  # None for a row dropped as empty


def clean_batch(work: RowWork, tokenizer: PreTrainedTokenizerBase, records: Sequence[Record], origins: list[str]) -> Chunk:
    """Normalise, redact, key, MinHash and tokenise a chunk of parsed rows: the pipeline's per-row work, independent
    of other rows (a row dropped later as a duplicate was tokenised for nothing: cheaper than a second pass)."""
    pii_counts: Counter[str] = Counter()
    cleaned = [_clean(record, work, pii_counts) for record in records]
    empty = [is_empty(r) for r in cleaned]
    keys = [dedupe_key(key_text(r, work.dedupe_key)) for r in cleaned]
    leaks = keys if work.leakage_key == work.dedupe_key else [dedupe_key(key_text(r, work.leakage_key)) for r in cleaned]
    hashes = [key_hash(k) for k in keys]
    leak_hashes = [h if leak == key else key_hash(leak) for key, leak, h in zip(keys, leaks, hashes)]
    sigs = signatures(keys) if work.near else None
    leak_sigs = None
    if work.leak_signatures:
        if sigs is None:
            leak_sigs = signatures(leaks)
        else:
            leak_sigs = sigs.copy()
            other = [i for i, (key, leak) in enumerate(zip(keys, leaks)) if key != leak]
            if other:
                leak_sigs[other] = signatures([leaks[i] for i in other])
    tokens: list[Tokenized | preference.PairTokenized | None] = [None] * len(cleaned)
    full = [i for i, e in enumerate(empty) if not (e and work.drop_empty)]
    for i, tok in zip(full, tokenize_batch([cleaned[i] for i in full], work.fmt, tokenizer, work.max_seq_length, seq2seq=work.seq2seq)):
        tokens[i] = tok
    return Chunk(cleaned, origins, pii_counts, empty, keys, hashes, leaks, leak_hashes, sigs, leak_sigs, tokens)


_WORK: tuple[RowWork, PreTrainedTokenizerBase] | None = None  # a worker process's work and tokenizer (inherited by fork)


def _set_work(work: RowWork, tokenizer: PreTrainedTokenizerBase) -> None:
    global _WORK
    _WORK = (work, tokenizer)
    # One thread per worker: the workers are the parallelism. Without this each forked worker's first batch starts
    # the Rust tokenizer's own thread pool (one thread per CPU), unless the parent had used it before forking.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _clean_in_worker(records: list[Record], origins: list[str]) -> Chunk:
    assert _WORK is not None
    return clean_batch(*_WORK, records, origins)


def worker_count() -> int:
    """Processes for the per-row work: the CPUs this process may run on, at most :data:`MAX_WORKERS`."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, MAX_WORKERS))


def cleaned_chunks(work: RowWork, tokenizer: PreTrainedTokenizerBase, parsed: Iterable[tuple[Record, str]], workers: int | None = None) -> Iterator[Chunk]:
    """:func:`clean_batch` over ``parsed`` in chunks of :data:`CHUNK_ROWS`, in order. With several CPUs and more than
    one chunk the chunks go to forked worker processes, at most two per worker in flight (memory stays bounded);
    the result is the same either way."""
    it = iter(parsed)
    batches = iter(lambda: list(itertools.islice(it, CHUNK_ROWS)), [])
    head = list(itertools.islice(batches, 2))
    workers = worker_count() if workers is None else workers
    if workers < 2 or len(head) < 2 or "fork" not in multiprocessing.get_all_start_methods():
        for batch in itertools.chain(head, batches):
            yield clean_batch(work, tokenizer, [r for r, _ in batch], [o for _, o in batch])
        return
    with multiprocessing.get_context("fork").Pool(workers, initializer=_set_work, initargs=(work, tokenizer)) as pool:
        in_flight: deque = deque()
        for batch in itertools.chain(head, batches):
            in_flight.append(pool.apply_async(_clean_in_worker, ([r for r, _ in batch], [o for _, o in batch])))
            if len(in_flight) >= 2 * workers:
                yield in_flight.popleft().get()
        while in_flight:
            yield in_flight.popleft().get()


def _records(ctx: PrepareContext, files: list[str], counts: StepCounts, known_labels: list[str] | None, label_where: str) -> Iterator[tuple[Record, str]]:
    """Parsed records of one input's files (malformed rows counted and skipped), not yet cleaned."""
    limits = ctx.spec.dataset.limits
    needed = columns(ctx.fmt, ctx.spec.dataset.fields)
    for item in read_rows(ctx.storage, counts.uri, ctx.work_dir, files, limits, needed):
        counts.rows_read += 1
        if isinstance(item, Malformed):
            raw = redact(item.raw, regions=ctx.pre.pii_regions) if ctx.pre.redact_pii else item.raw
            counts.add_malformed(item.origin, item.reason, raw)
            continue
        parsed = parse_record(item.data, ctx.fmt, ctx.spec.dataset.fields)
        if isinstance(parsed, str):
            raw = str(item.data)
            counts.add_malformed(item.origin, parsed, redact(raw, regions=ctx.pre.pii_regions) if ctx.pre.redact_pii else raw)
            continue
        expansion = max(map(nfkc_expansion, texts(parsed)), default=1.0)
        if expansion > limits.max_normalization_expansion:
            preview = " ".join(text[: reports.PREVIEW_CHARS] for text in texts(parsed))[: reports.PREVIEW_CHARS]
            reason = (f"Unicode NFKC makes its text {expansion:.1f} times longer, more than "
                      f"dataset.limits.maxNormalizationExpansion {limits.max_normalization_expansion:g}")
            counts.add_malformed(item.origin, reason, redact(preview, regions=ctx.pre.pii_regions) if ctx.pre.redact_pii else preview)
            continue
        if known_labels is not None:
            check_label(parsed["label"], known_labels, item.origin, label_where)
        yield parsed, item.origin


@dataclass
class _Candidate:
    """A row that passed dedupe, waiting to be written with its batch; ``key``, ``hash_`` and ``sig``
    are its leakage key's (what the staged row carries for the checks between splits)."""

    record: Record
    origin: str
    key: str
    hash_: bytes
    sig: np.ndarray | None
    tok: Tokenized | preference.PairTokenized


class _Stager:
    """One input's staging: the duplicate index, the counts and the Arrow sink, row by row."""

    def __init__(self, ctx: PrepareContext, name: str, uri: str, files: list[str]):
        self.ctx, self.name = ctx, name
        pre = ctx.pre
        self.counts = StepCounts(uri=uri, files=len(files))
        self.classification = ctx.fmt == CLASSIFICATION
        columns = [("input_ids", pa.list_(pa.int32()))]
        columns += [("label_name", pa.string())] if self.classification else [("labels", pa.list_(pa.int32()))]
        if ctx.fmt == PREFERENCE:
            columns += [(name, pa.list_(pa.int32())) for name in preference.PAIR_COLUMNS]
        self.sink = ArrowSink(ctx.work_dir / f"staged-{name}.arrow", pa.schema(columns + _STAGED_COMMON))
        self.index = DuplicateIndex(pre.dedupe.near_threshold, near=pre.dedupe.near, spill_dir=ctx.work_dir)
        self.conflicts = LabelConflicts(wire_value(pre.label_conflicts)) if self.classification else None
        self.label_counts: Counter[str] = Counter()
        self.pending: list[_Candidate] = []
        self.index_rows = ArrowSink(ctx.work_dir / f"index-{name}.arrow", _INDEX_ROWS)
        self.duplicates: list[tuple[str, str, str, int, float]] = []  # kind, origin, preview, matched id, similarity

    def _duplicate(self, kind: str, origin: str, preview: str, matched: int, similarity: float) -> None:
        if sum(1 for d in self.duplicates if d[0] == kind) < reports.MAX_EXAMPLES:
            self.duplicates.append((kind, origin, preview[: reports.PREVIEW_CHARS], matched, similarity))

    def offer(self, chunk: Chunk) -> None:
        """Count each row of the chunk at the first step that drops it, or queue it for tokenisation (in order)."""
        pre, counts = self.ctx.pre, self.counts
        counts.pii.update(chunk.pii)
        open_rows = [i for i, empty in enumerate(chunk.empty) if not (empty and pre.drop_empty)]
        counts.empty += len(chunk.records) - len(open_rows)
        if self.conflicts is not None and open_rows:
            conflicting = self.conflicts.conflicts([chunk.hashes[i] for i in open_rows], [chunk.records[i]["label"] for i in open_rows],
                                                   [chunk.origins[i] for i in open_rows], [chunk.keys[i] for i in open_rows], counts)
            open_rows = [i for i, conflict in zip(open_rows, conflicting) if not conflict]
        sigs = chunk.sigs[open_rows] if chunk.sigs is not None else None
        kinds, matched, similarity = dedupe_batch(self.index, hash_words([chunk.hashes[i] for i in open_rows]), sigs, pre.dedupe.exact)
        for i, kind, match, sim in zip(open_rows, kinds.tolist(), matched.tolist(), similarity.tolist()):
            origin, key = chunk.origins[i], chunk.keys[i]
            if kind == EXACT:
                counts.exact_duplicates += 1
                self._duplicate("exact", origin, key, match, 1.0)
            elif kind == NEAR:
                counts.near_duplicates += 1
                self._duplicate("near", origin, key, match, sim)
            else:
                self.index_rows.append({"origin": origin, "preview": key[: reports.PREVIEW_CHARS]})
                leak_sig = chunk.leak_sigs[i] if chunk.leak_sigs is not None else None
                tok = chunk.tokens[i]
                assert tok is not None  # only rows dropped as empty are not tokenised
                self.pending.append(_Candidate(chunk.records[i], origin, chunk.leaks[i], chunk.leak_hashes[i], leak_sig, tok))
                if len(self.pending) >= BATCH_ROWS:
                    self.flush()

    def flush(self) -> None:
        """Keep the pending (tokenised) rows within the token limits, written as a batch."""
        pre, counts = self.ctx.pre, self.counts
        for candidate in self.pending:
            tok = candidate.tok
            if tok.length < pre.min_tokens:
                counts.too_short += 1
            elif pre.max_tokens is not None and tok.length > pre.max_tokens:
                counts.too_long += 1
            elif tok.trainable == 0:
                counts.no_trainable_tokens += 1
            else:
                counts.rows_kept += 1
                counts.truncated += tok.truncated
                counts.tokens += tok.token_count if isinstance(tok, preference.PairTokenized) else len(tok.input_ids)
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
                if isinstance(tok, preference.PairTokenized):
                    row.update(tok.columns())
                self.sink.append(row)
        self.pending.clear()

    def _duplicate_examples(self) -> list[dict[str, object]]:
        """The report's duplicate pairs: each dropped row beside the earlier row it duplicates."""
        index_rows = self.index_rows.finish()
        out: list[dict[str, object]] = []
        for kind, origin, preview, matched, similarity in self.duplicates:
            first = index_rows[matched]
            out.append({"match": kind, "row": origin, "text": preview, "duplicate_of": first["origin"],
                        "duplicate_of_text": first["preview"], "similarity": round(similarity, 4)})
        self.index_rows.path.unlink()
        return out

    def finish(self) -> datasets.Dataset:
        self.flush()
        self.counts.duplicate_examples = self._duplicate_examples()
        staged = self.sink.finish()
        self.index.close()
        if self.conflicts is not None:
            staged = self.conflicts.settle(staged, self.counts, self.label_counts, self.name)
        return staged


def stage(ctx: PrepareContext, name: str, uri: str, known_labels: list[str] | None = None, label_where: str = "") -> tuple[datasets.Dataset, StepCounts, Counter[str]]:
    """Read, clean, dedupe and tokenise one input into a staged Arrow dataset (see the module docstring)."""
    files = data_files(ctx.storage, uri)
    stager = _Stager(ctx, name, uri, files)
    for chunk in cleaned_chunks(RowWork.of(ctx), ctx.tokenizer, _records(ctx, files, stager.counts, known_labels, label_where)):
        stager.offer(chunk)
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
