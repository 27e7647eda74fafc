"""Stage 1: read rows from JSONL, CSV or Parquet files, one at a time.

A dataset URI is one file or a prefix; a prefix means every data file under it, in sorted order (so
the row order, and everything downstream, is deterministic). Files on S3 are downloaded one at a
time into a scratch folder and deleted after reading, so neither RAM nor disk has to hold the whole
dataset. Rows that cannot be parsed are yielded as :class:`Malformed` so the caller counts them in
order with the good rows; the caller decides when there are too many. A file that cannot be decoded
at all, or stops decoding part-way (a truncated ``.gz``, a damaged Parquet page), raises MalformedData
naming the file, the cause and how many of its rows were read (and yielded) before the damage.

Supported files: ``.jsonl``/``.ndjson``/``.json`` (JSON Lines; a ``.json`` file that starts with ``[``
is read as one JSON array, streamed element by element), ``.csv``/``.tsv`` (header row required), and
``.parquet`` (read one batch at a time, its text columns as dictionaries). ``.gz`` is accepted after the
JSON Lines and CSV extensions.

Every read is bounded by ``dataset.limits`` (see :mod:`.limits`): a file's bytes after decompression by
``maxFileBytes``, one row (a line, a CSV record, a JSON array element, a Parquet row's decoded values) by
``maxRecordBytes``; past a cap the file raises MalformedData naming the cap, whatever the file holds.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import json
import shutil
import sys
import tempfile
import zlib
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from finetune_api.spec import DataLimits
from finetune_trainer.data.limits import (
    DEFAULT_LIMITS,
    JSON_BUFFER,
    ElementBudget,
    batch_row_bytes,
    file_too_large,
    open_capped,
    parquet_batch_rows,
    row_slices,
    row_too_large,
)
from finetune_trainer.errors import DatasetNotFound, MalformedData
from finetune_trainer.storage import Storage, is_s3

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
CSV_SUFFIXES = (".csv", ".tsv")
PARQUET_SUFFIXES = (".parquet", ".pq")
PARQUET_BATCH_ROWS = 1024

csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # long documents in one cell are normal; _Lines caps a record


@dataclass(frozen=True)
class Row:
    """A parsed row and where it came from (``file:line`` for messages and the report)."""

    data: dict[str, Any]
    origin: str


@dataclass(frozen=True)
class Malformed:
    """A row that could not be parsed, with the reason and the raw text (for the report's examples)."""

    origin: str
    reason: str
    raw: str = ""


def file_kind(uri: str) -> str | None:
    """``jsonl``, ``csv``, ``parquet`` or None (not a data file) from the file name."""
    name = uri.rsplit("/", 1)[-1].lower()
    if name.endswith(".gz"):
        name = name[:-3]
        if name.endswith(PARQUET_SUFFIXES):
            return None
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(CSV_SUFFIXES):
        return "csv"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return None


def data_files(storage: Storage, uri: str) -> list[str]:
    """The data files a dataset URI stands for, sorted; DatasetNotFound when there are none."""
    try:
        found = storage.list(uri)
    except FileNotFoundError as exc:
        raise DatasetNotFound(f"dataset {uri} not found: {exc}. Check the URI and that the bucket exists.") from None
    if not found:
        raise DatasetNotFound(f"dataset {uri} not found: no object or file there, and no files under it as a prefix.")
    files = [f for f in found if file_kind(f)]
    if not files:
        others = ", ".join(f.rsplit("/", 1)[-1] for f in found[:3])
        raise DatasetNotFound(
            f"dataset {uri} holds no JSONL, CSV or Parquet files ({len(found)} other files, e.g. {others}). "
            "Data files must end in .jsonl, .json, .csv, .tsv or .parquet (optionally .gz for JSON Lines and CSV)."
        )
    return files


def read_rows(
    storage: Storage,
    uri: str,
    scratch_dir: Path,
    files: list[str] | None = None,
    limits: DataLimits = DEFAULT_LIMITS,
    columns: list[str] | None = None,
) -> Iterator[Row | Malformed]:
    """Every row of every data file under ``uri`` (or of ``files``, from :func:`data_files`), in order,
    each file read within ``limits`` (``dataset.limits``). ``columns``: the only ones a columnar file
    (Parquet) is read for; rows of the other formats hold whatever they hold."""
    for file_uri in files if files is not None else data_files(storage, uri):
        if is_s3(file_uri):
            tmp = Path(tempfile.mkdtemp(prefix="download-", dir=scratch_dir))
            try:
                try:
                    local = storage.download(file_uri, tmp / file_uri.rsplit("/", 1)[-1])
                except FileNotFoundError:
                    raise DatasetNotFound(f"dataset file {file_uri} disappeared while reading.") from None
                yield from read_file(local, display=file_uri, limits=limits, columns=columns)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        else:
            yield from read_file(Path(file_uri), display=file_uri, limits=limits, columns=columns)


def read_file(
    path: Path, display: str | None = None, limits: DataLimits = DEFAULT_LIMITS, columns: list[str] | None = None
) -> Iterator[Row | Malformed]:
    """Every row of one file. A file that cannot be decoded (a truncated or corrupt ``.gz``, a damaged
    Parquet page, bytes that are not the format at all) raises MalformedData naming the file, the cause
    and how many rows of it were read before the damage (those were already yielded and counted); so
    does one past a cap of ``limits``."""
    display = display or str(path)
    kind = file_kind(display)
    if kind == "jsonl":
        reader = _read_jsonl
    elif kind == "csv":
        reader = _read_csv
    elif kind == "parquet":
        reader = partial(_read_parquet, columns=columns)
    else:  # pragma: no cover - data_files() filters these out
        raise ValueError(f"not a data file: {display}")
    count = 0
    try:
        for item in reader(path, display, limits):
            count += 1
            yield item
    except FileNotFoundError:
        raise DatasetNotFound(f"dataset file {display} disappeared while reading.") from None
    except _decode_errors() as exc:
        raise MalformedData(_unreadable(display, kind, count, exc)) from None


def _decode_errors() -> tuple[type[BaseException], ...]:
    """What a damaged file raises while it is read: gzip/zlib (OSError incl. BadGzipFile, EOFError,
    zlib.error), pyarrow (ArrowException: ArrowInvalid, ...; its IO errors are OSError), text decoding."""
    import pyarrow as pa

    return (OSError, EOFError, zlib.error, UnicodeDecodeError, pa.ArrowException)


def _unreadable(display: str, kind: str, count: int, exc: BaseException) -> str:
    cause = " ".join(str(exc).split())[:300] or "no details"
    cause = f"{type(exc).__name__}: {cause}"
    what = {"jsonl": "JSON Lines", "csv": "CSV", "parquet": "Parquet"}[kind]
    if display.lower().endswith(".gz"):
        what = f"gzip-compressed {what}"
    if count == 0:
        return f"{display} cannot be read as {what} ({cause}). Check that the file is complete and in the format its name says."
    return (
        f"{display} is corrupt or truncated: reading it as {what} failed after {count} rows ({cause}). "
        "Re-upload or regenerate the file, or remove it from the dataset."
    )


def _open_binary(path: Path, display: str, limits: DataLimits) -> io.BufferedReader:
    """The file's bytes (a ``.gz`` file's decompressed bytes), failing past ``limits.maxFileBytes``."""
    raw = gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")
    return open_capped(raw, limits, display)


def _open_text(path: Path, display: str, limits: DataLimits) -> io.TextIOBase:
    return io.TextIOWrapper(_open_binary(path, display, limits), encoding="utf-8", errors="replace", newline="")


class _Lines:
    """The text lines of a file, each decoded on its own, remembering which held invalid UTF-8.

    Such a line is decoded with U+FFFD replacement (so the reader never stops) and reported as a malformed
    row by its reader rather than passed on with silently mangled text. A row may span lines (a quoted CSV
    field with line breaks): the reader calls :meth:`mark` at each row's end, and a row whose lines add up
    to more than ``maxRecordBytes`` raises MalformedData; no line is read further than that cap.
    """

    def __init__(self, path: Path, display: str, limits: DataLimits, *, row_per_line: bool):
        self.path, self.display, self.limits = path, display, limits
        self.row_per_line = row_per_line
        self.bad: set[int] = set()  # 1-based line numbers
        self._pending = 0  # bytes of the row being read

    def mark(self) -> None:
        """The row being read ended."""
        self._pending = 0

    def __iter__(self) -> Iterator[str]:
        cap = self.limits.record_bytes
        with _open_binary(self.path, self.display, self.limits) as f:
            lineno = 0
            while raw := f.readline(cap + 1 - self._pending):
                lineno += 1
                self._pending += len(raw)
                if self._pending > cap:
                    raise MalformedData(row_too_large(self.display, f"the row at line {lineno}", cap))
                try:
                    yield raw.decode("utf-8")
                except UnicodeDecodeError:
                    self.bad.add(lineno)
                    yield raw.decode("utf-8", errors="replace")
                if self.row_per_line:
                    self._pending = 0


INVALID_UTF8 = "invalid UTF-8"


def _first_char(path: Path, display: str, limits: DataLimits) -> str:
    with _open_text(path, display, limits) as f:
        while True:
            chunk = f.read(4096)
            if not chunk:
                return ""
            stripped = chunk.lstrip("\ufeff \t\r\n")
            if stripped:
                return stripped[0]


def _read_jsonl(path: Path, display: str, limits: DataLimits) -> Iterator[Row | Malformed]:
    if _first_char(path, display, limits) == "[":
        yield from _read_json_array(path, display, limits)
        return
    lines = _Lines(path, display, limits, row_per_line=True)
    for lineno, line in enumerate(lines, start=1):
        line = line.strip().lstrip("\ufeff")
        if not line:
            continue  # blank lines are layout, not rows
        origin = f"{display}:{lineno}"
        if lineno in lines.bad:
            yield Malformed(origin, INVALID_UTF8, line)
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            yield Malformed(origin, f"invalid JSON ({exc.msg} at column {exc.colno})", line)
            continue
        if not isinstance(obj, dict):
            yield Malformed(origin, f"a JSON {type(obj).__name__}, not an object", line)
            continue
        yield Row(obj, origin)


def _read_json_array(path: Path, display: str, limits: DataLimits) -> Iterator[Row | Malformed]:
    """A top-level JSON array, parsed incrementally (ijson): one element in memory at a time."""
    import ijson

    with _open_binary(path, display, limits) as f:
        if f.peek(3).startswith(codecs.BOM_UTF8):
            f.read(3)
        budget = ElementBudget(f, limits.record_bytes, display)
        try:
            for obj in ijson.items(budget, "item", use_float=True, buf_size=JSON_BUFFER):
                origin = f"{display}[{budget.index}]"
                budget.mark()
                if isinstance(obj, dict):
                    yield Row(obj, origin)
                else:
                    yield Malformed(origin, f"a JSON {type(obj).__name__}, not an object", json.dumps(obj)[:200])
        except ijson.JSONError as exc:
            cause = " ".join(str(exc).split())[:200]
            raise MalformedData(
                f"{display} is not a valid JSON array after {budget.index} elements ({cause}); use JSON Lines, one object per line."
            ) from None


def _read_csv(path: Path, display: str, limits: DataLimits) -> Iterator[Row | Malformed]:
    delimiter = "\t" if display.lower().removesuffix(".gz").endswith(".tsv") else ","
    lines = _Lines(path, display, limits, row_per_line=False)
    reader = csv.reader(lines, delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        return
    except csv.Error as exc:
        raise MalformedData(f"{display}: cannot read the CSV header ({exc}).") from None
    header = [h.lstrip("\ufeff").strip() for h in header]
    last_line = reader.line_num
    while True:
        first_line = last_line + 1
        lines.mark()
        try:
            values = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            last_line = reader.line_num
            yield Malformed(f"{display}:{reader.line_num}", f"CSV error: {exc}")
            continue
        origin = f"{display}:{reader.line_num}"
        last_line = reader.line_num
        if not values or values == [""]:
            continue
        if any(n in lines.bad for n in range(first_line, last_line + 1)):
            yield Malformed(origin, INVALID_UTF8, delimiter.join(values))
            continue
        if len(values) != len(header):
            raw = delimiter.join(values)
            yield Malformed(origin, f"{len(values)} fields where the header has {len(header)}", raw)
            continue
        yield Row(dict(zip(header, values)), origin)


def _read_parquet(path: Path, display: str, limits: DataLimits, columns: list[str] | None = None) -> Iterator[Row | Malformed]:
    """Batch by batch, only ``columns`` (all when None; those the file lacks are left out), with every
    text (BYTE_ARRAY) column read as a dictionary, so a batch holds what the file holds: a dictionary
    bomb (one long value repeated in every row) stays one value and its indices. The metadata sizes the
    batches (:func:`~.limits.parquet_batch_rows`) and each row's decoded size is computed before anything
    is decoded into Python."""
    import pyarrow.parquet as pq

    try:
        metadata = pq.ParquetFile(path).metadata
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise MalformedData(f"{display} is not a readable Parquet file ({exc}).") from None
    names = metadata.schema.to_arrow_schema().names
    wanted = names if columns is None else [name for name in names if name in columns]
    batch_rows = parquet_batch_rows(metadata, wanted, limits, display, PARQUET_BATCH_ROWS)
    schema = metadata.schema
    texts = [schema.column(i).path for i in range(len(schema)) if schema.column(i).physical_type == "BYTE_ARRAY"]
    parquet = pq.ParquetFile(path, metadata=metadata, read_dictionary=texts)
    row_cap, file_cap = limits.record_bytes, limits.file_bytes
    index = decoded = 0
    # One row group at a time: a batch spanning row groups would need chunked nested dictionaries,
    # which pyarrow cannot build.
    for group, rows in enumerate(batch_rows):
        for batch in parquet.iter_batches(batch_size=rows, row_groups=[group], columns=wanted):
            sizes = batch_row_bytes(batch)
            over = np.flatnonzero(sizes > row_cap)
            if len(over):
                raise MalformedData(row_too_large(display, f"row {index + int(over[0])} ({int(sizes[over[0]])} bytes decoded)", row_cap))
            decoded += int(sizes.sum())
            if decoded > file_cap:
                raise MalformedData(file_too_large(display, file_cap))
            for start, stop in row_slices(sizes, row_cap):
                for obj in batch.slice(start, stop - start).to_pylist():
                    yield Row(obj, f"{display}#{index}")
                    index += 1
