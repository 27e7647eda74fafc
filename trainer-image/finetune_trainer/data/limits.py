"""Bounded reading: ``dataset.limits`` applied to the bytes a data file makes the trainer read and hold.

Every reader in :mod:`.readers` reads through these, so no file, whatever it holds, can make the
trainer hold more than about one row's worth of data (``maxRecordBytes``) or read more than
``maxFileBytes`` of it after decompression. Past a cap the reader raises MalformedData naming the file,
the cap and the spec field that sets it, well before the pod's memory limit:

- :class:`CappedStream`: a binary stream (a file, or a ``.gz`` file's decompressed text) that fails
  once more than ``maxFileBytes`` were read from it: a gzip bomb stops at the cap.
- :class:`ElementBudget`: a stream for the streaming JSON parser (ijson) that fails when one array
  element has taken more than ``maxRecordBytes`` without being complete.
- :func:`parquet_batch_rows`: from a Parquet file's metadata, before reading it, whether it declares
  more than the caps allow, and how many rows each batch of a row group may hold.
- :func:`row_bytes` / :func:`row_slices`: the decoded size of each row of a Parquet batch that was
  read with its text columns as dictionaries, computed from the dictionary and its indices without
  decoding anything, so a dictionary bomb (one long string repeated in every row) is refused before it
  is expanded, and the rows are turned into Python objects in slices of at most ``maxRecordBytes``.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, BinaryIO, Iterator, Union

import numpy as np

from finetune_api.spec import DataLimits, bytes_quantity
from finetune_trainer.errors import MalformedData

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.parquet

ByteStream = Union[BinaryIO, io.BufferedIOBase]  # a plain file, a gzip file, a buffered reader

DEFAULT_LIMITS = DataLimits()
JSON_BUFFER = 64 * 1024  # bytes the streaming JSON parser asks for at a time
_PY_ROW_OVERHEAD = 64  # bytes a decoded value costs besides its data (object headers), for the estimate


def _cap(limit: int, field: str) -> str:
    return f"{bytes_quantity(limit)} (dataset.limits.{field})"


_FILE_ADVICE = (
    "A highly compressed file that expands this far is usually not data (a decompression bomb); split a real "
    "file into several, or raise dataset.limits.maxFileBytes."
)


def file_too_large(display: str, limit: int) -> str:
    return f"{display} holds more than {_cap(limit, 'maxFileBytes')} after decompression; reading stopped there. {_FILE_ADVICE}"


def declared_too_large(display: str, limit: int) -> str:
    return f"{display}: its Parquet metadata declares more than {_cap(limit, 'maxFileBytes')} of column data once read; it was not read. {_FILE_ADVICE}"


def row_too_large(display: str, where: str, limit: int) -> str:
    return (
        f"{display}: {where} is longer than {_cap(limit, 'maxRecordBytes')}. A file without line breaks, a CSV "
        "with an unclosed quote or a file in another format than its name says looks like this; split the row, "
        "or raise dataset.limits.maxRecordBytes."
    )


class CappedStream(io.RawIOBase):
    """The bytes of ``inner``, failing with MalformedData once more than ``limit`` were read."""

    def __init__(self, inner: ByteStream, limit: int, display: str):
        self._inner = inner
        self.limit = limit
        self.display = display
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        # Never ask for more than one byte past the cap (count <= limit here): that byte tells it was passed.
        n = self._inner.readinto(memoryview(buffer)[: self.limit + 1 - self.count]) or 0
        self.count += n
        if self.count > self.limit:
            raise MalformedData(file_too_large(self.display, self.limit))
        return n

    def close(self) -> None:
        try:
            self._inner.close()
        finally:
            super().close()


def open_capped(raw: ByteStream, limits: DataLimits, display: str) -> io.BufferedReader:
    """``raw`` (a plain or gzip file opened for bytes) buffered behind a :class:`CappedStream`."""
    return io.BufferedReader(CappedStream(raw, limits.file_bytes, display), buffer_size=JSON_BUFFER)


class ElementBudget:
    """What ijson reads from: ``inner``'s bytes, failing when the element being parsed passes the cap.

    ijson builds each array element in memory before yielding it. The reader calls :meth:`mark` at
    every element it receives; more than ``maxRecordBytes`` (plus one read-ahead buffer) read since then
    means one element is that large, so the read fails instead of letting it grow.
    """

    def __init__(self, inner: ByteStream, limit: int, display: str):
        self._inner = inner
        self.limit = limit
        self.display = display
        self.count = 0
        self._mark = 0
        self.index = 0  # elements received so far

    def mark(self) -> None:
        self._mark = self.count
        self.index += 1

    def read(self, size: int = -1) -> bytes:
        if size == 0:  # ijson's probe for bytes or text
            return b""
        data = self._inner.read(size if size > 0 else JSON_BUFFER)
        self.count += len(data)
        if self.count - self._mark > self.limit + JSON_BUFFER:
            raise MalformedData(row_too_large(self.display, f"element {self.index} of the JSON array", self.limit))
        return data


# ------------------------------------------------------------------------------ Parquet batches

# Arrow bytes per leaf value once read, by Parquet physical type (BYTE_ARRAY: a dictionary index, the
# dictionary itself counted with the chunk's uncompressed bytes), plus 4 for list offsets and validity.
_VALUE_BYTES = {"BOOLEAN": 1, "INT32": 4, "INT64": 8, "INT96": 12, "FLOAT": 4, "DOUBLE": 8, "BYTE_ARRAY": 4}
_OFFSET_BYTES = 4


def _reads(path: str, columns: list[str]) -> bool:
    """Whether a leaf column (``a.list.element.b``) belongs to one of the top-level ``columns``."""
    return any(path == name or path.startswith(name + ".") for name in columns)


def parquet_batch_rows(metadata: pa.parquet.FileMetaData, columns: list[str], limits: DataLimits, display: str, most: int) -> list[int]:
    """Rows per batch for each row group, from what the file's metadata declares, before reading it.

    A row group's leaf value counts (``num_values``) and uncompressed bytes give the Arrow memory reading
    all of it would take (text read as dictionaries). More than ``maxFileBytes`` over the file, or rows
    averaging more than ``maxRecordBytes``, is refused; otherwise each batch is sized to hold about one
    ``maxRecordBytes`` of it on average (at most ``most`` rows). What metadata cannot show, one row far
    larger than its row group's average, is measured per batch by :func:`batch_row_bytes`.
    """
    record, total = limits.record_bytes, 0
    plan: list[int] = []
    for group in range(metadata.num_row_groups):
        meta = metadata.row_group(group)
        declared = 0
        for j in range(meta.num_columns):
            chunk = meta.column(j)
            if _reads(chunk.path_in_schema, columns):
                width = _VALUE_BYTES.get(chunk.physical_type, 16) + _OFFSET_BYTES
                declared += chunk.num_values * width + chunk.total_uncompressed_size
        total += declared
        if total > limits.file_bytes:
            raise MalformedData(declared_too_large(display, limits.file_bytes))
        average = declared // max(meta.num_rows, 1)
        if average > record:
            raise MalformedData(row_too_large(display, f"the average row of row group {group} ({average} bytes decoded)", record))
        plan.append(max(1, min(most, record // max(average, 1))))
    return plan


def row_bytes(array: pa.Array) -> np.ndarray:
    """Decoded bytes of each row of ``array`` (about what ``to_pylist`` builds), computed without
    decoding: a dictionary column costs its values' sizes looked up by index. Nested lists and structs
    add up their children."""
    import pyarrow as pa
    import pyarrow.compute as pc

    n = len(array)
    kind = array.type
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    if isinstance(array, pa.ChunkedArray):  # pragma: no cover - batches hold plain arrays
        return np.concatenate([row_bytes(chunk) for chunk in array.chunks])
    if pa.types.is_dictionary(kind):
        values = row_bytes(array.dictionary)
        if len(values) == 0:
            return np.zeros(n, dtype=np.int64)
        indices = array.indices.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        sizes = values[indices]
    elif pa.types.is_string(kind) or pa.types.is_binary(kind) or pa.types.is_large_string(kind) or pa.types.is_large_binary(kind):
        sizes = pc.binary_length(array).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64) + _PY_ROW_OVERHEAD
    elif pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind) or pa.types.is_map(kind):
        flat = array.flatten()
        parents = pc.list_parent_indices(array).to_numpy(zero_copy_only=False)
        sizes = np.bincount(parents, weights=row_bytes(flat), minlength=n).astype(np.int64) + _PY_ROW_OVERHEAD
    elif pa.types.is_struct(kind):
        sizes = np.full(n, _PY_ROW_OVERHEAD, dtype=np.int64)
        for child in array.flatten():
            sizes += row_bytes(child)
    else:
        width = kind.bit_width // 8 if getattr(kind, "bit_width", 0) else array.nbytes // n
        sizes = np.full(n, max(int(width), 1) + _PY_ROW_OVERHEAD, dtype=np.int64)
    if array.null_count:
        sizes = np.where(array.is_null().to_numpy(zero_copy_only=False), 0, sizes)
    return sizes


def batch_row_bytes(batch: pa.RecordBatch) -> np.ndarray:
    """Decoded bytes of each row of a record batch: the sum over its columns."""
    sizes = np.zeros(batch.num_rows, dtype=np.int64)
    for column in batch.columns:
        sizes += row_bytes(column)
    return sizes


def row_slices(sizes: np.ndarray, budget: int) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` runs of consecutive rows whose sizes add up to at most ``budget`` (at least
    one row each), so no more than one budget's worth of rows is decoded into Python at a time."""
    ends = np.cumsum(sizes)
    start = 0
    while start < len(sizes):
        base = int(ends[start - 1]) if start else 0
        stop = max(int(np.searchsorted(ends, base + budget, side="right")), start + 1)
        yield start, stop
        start = stop
