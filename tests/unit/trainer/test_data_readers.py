"""Readers: JSONL, CSV, Parquet, prefixes, malformed rows, missing data."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from moto import mock_aws

from finetune_trainer.data.readers import Malformed, Row, read_rows
from finetune_trainer.errors import DatasetNotFound, MalformedData
from finetune_trainer.storage import Storage


def _read(uri: str, tmp_path: Path, storage: Storage | None = None) -> tuple[list[Row], list[Malformed]]:
    items = list(read_rows(storage or Storage(), uri, tmp_path))
    return [i for i in items if isinstance(i, Row)], [i for i in items if isinstance(i, Malformed)]


def test_jsonl_counts_malformed_lines(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(
        '{"text": "one"}\n'
        "\n"  # blank lines are skipped, not counted
        '{"text": "two"\n'  # truncated object
        '["a", "list"]\n'
        '{"text": "three"}\n'
    )
    rows, bad = _read(str(path), tmp_path)
    assert [r.data["text"] for r in rows] == ["one", "three"]
    assert [r.origin for r in rows] == [f"{path}:1", f"{path}:5"]
    assert [(m.origin, m.reason.split(" (")[0]) for m in bad] == [(f"{path}:3", "invalid JSON"), (f"{path}:4", "a JSON list, not an object")]


def test_json_array_and_gzip(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.json").write_text(json.dumps([{"text": "x"}, 5, {"text": "y"}]))
    with gzip.open(tmp_path / "d" / "b.jsonl.gz", "wt") as f:
        f.write('{"text": "z"}\n')
    rows, bad = _read(str(tmp_path / "d"), tmp_path)
    assert [r.data["text"] for r in rows] == ["x", "y", "z"]
    assert len(bad) == 1 and bad[0].origin.endswith("a.json[1]")


def test_csv_wrong_field_count_is_malformed(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text('text,label\n"hello, world",pos\nbad row with,too,many\n"multi\nline",neg\nonly-one-field\n')
    rows, bad = _read(str(path), tmp_path)
    assert [r.data for r in rows] == [{"text": "hello, world", "label": "pos"}, {"text": "multi\nline", "label": "neg"}]
    assert [m.reason for m in bad] == ["3 fields where the header has 2", "1 fields where the header has 2"]


def test_parquet_with_chat_column(tmp_path):
    table = pa.table(
        {
            "messages": [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]] * 3,
            "n": [1, 2, 3],
        }
    )
    pq.write_table(table, tmp_path / "train.parquet", row_group_size=2)
    rows, bad = _read(str(tmp_path / "train.parquet"), tmp_path)
    assert bad == []
    assert [r.data["n"] for r in rows] == [1, 2, 3]
    assert rows[0].data["messages"][1] == {"role": "assistant", "content": "hello"}


def test_prefix_reads_all_data_files_in_sorted_order_and_ignores_others(tmp_path):
    root = tmp_path / "data"
    (root / "part2").mkdir(parents=True)
    (root / "b.jsonl").write_text('{"text": "b"}\n')
    (root / "a.csv").write_text("text\na\n")
    (root / "part2" / "c.parquet").write_bytes(b"")
    pq.write_table(pa.table({"text": ["c"]}), root / "part2" / "c.parquet")
    (root / "_SUCCESS").write_text("")
    (root / "README.md").write_text("not data")
    rows, _ = _read(str(root), tmp_path)
    assert [r.data["text"] for r in rows] == ["a", "b", "c"]


def test_missing_uri_and_empty_prefix_raise_dataset_not_found(tmp_path):
    with pytest.raises(DatasetNotFound, match=str(tmp_path / "nope.jsonl")):
        _read(str(tmp_path / "nope.jsonl"), tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetNotFound, match="empty"):
        _read(str(tmp_path / "empty"), tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.txt").write_text("x")
    with pytest.raises(DatasetNotFound, match="no JSONL, CSV or Parquet files"):
        _read(str(tmp_path / "docs"), tmp_path)


def test_unreadable_parquet_is_malformed_data(tmp_path):
    (tmp_path / "x.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(MalformedData, match="x.parquet"):
        _read(str(tmp_path / "x.parquet"), tmp_path)


def test_s3_prefix_and_missing_objects(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with mock_aws():
        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket="data")
        s3.put_object(Bucket="data", Key="sets/train/0.jsonl", Body=b'{"text": "s3 one"}\n{"text": "s3 two"}\n')
        s3.put_object(Bucket="data", Key="sets/train/1.csv", Body=b"text\ns3 three\n")
        s3.put_object(Bucket="data", Key="sets/train-old/0.jsonl", Body=b'{"text": "sibling"}\n')
        storage = Storage(region="us-east-1")
        scratch = tmp_path / "scratch"
        scratch.mkdir()
        rows, _ = _read("s3://data/sets/train", scratch, storage)
        assert [r.data["text"] for r in rows] == ["s3 one", "s3 two", "s3 three"]
        assert rows[0].origin == "s3://data/sets/train/0.jsonl:1"
        assert list(scratch.iterdir()) == []  # downloads are removed after reading
        with pytest.raises(DatasetNotFound, match="s3://data/sets/missing"):
            _read("s3://data/sets/missing", scratch, storage)
        with pytest.raises(DatasetNotFound, match="s3://no-bucket/x"):
            _read("s3://no-bucket/x", scratch, storage)


def _read_until_error(uri: str, tmp_path: Path) -> tuple[list[Row | Malformed], BaseException]:
    """The items a reader yields before it raises, and what it raised."""
    items: list[Row | Malformed] = []
    with pytest.raises(MalformedData) as info:
        for item in read_rows(Storage(), uri, tmp_path):
            items.append(item)
    return items, info.value


def test_truncated_gzip_jsonl_is_malformed_data_naming_the_file(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    (root / "a.jsonl").write_text('{"text": "before"}\n{"text": "also before"}\nnot json\n')
    body = "".join(json.dumps({"text": f"row {i} " + "x" * 60}) + "\n" for i in range(3000)).encode()
    packed = gzip.compress(body)
    (root / "b.jsonl.gz").write_bytes(packed[: len(packed) // 2])  # an upload cut off half way
    items, err = _read_until_error(str(root), tmp_path)
    # a.jsonl in full (the malformed line still counted in order), then b's rows up to the damage.
    assert [getattr(i, "data", None) for i in items[:3]] == [{"text": "before"}, {"text": "also before"}, None]
    from_b = items[3:]
    assert 0 < len(from_b) < 3000 and all(isinstance(i, Row) for i in from_b)
    assert [i.origin for i in from_b] == [f"{root / 'b.jsonl.gz'}:{n}" for n in range(1, len(from_b) + 1)]
    line = err.line()
    assert line.startswith(f"MalformedData: {root / 'b.jsonl.gz'} is corrupt or truncated: reading it as gzip-compressed JSON Lines ")
    assert f"failed after {len(from_b)} rows (EOFError: " in line and "\n" not in line
    assert err.exit_code == MalformedData.exit_code

    # Not gzip at all under a .gz name: unreadable from the first byte.
    (tmp_path / "plain.csv.gz").write_text("text\nhello\n")
    items, err = _read_until_error(str(tmp_path / "plain.csv.gz"), tmp_path)
    assert items == []
    assert err.line().startswith(f"MalformedData: {tmp_path / 'plain.csv.gz'} cannot be read as gzip-compressed CSV (BadGzipFile: ")


def test_parquet_corrupt_part_way_is_malformed_data_after_the_good_row_groups(tmp_path):
    path = tmp_path / "train.parquet"
    n_groups, group = 4, 1024  # one row group per reader batch
    texts = [f"row {i} " + "y" * 40 for i in range(n_groups * group)]
    pq.write_table(pa.table({"text": texts}), path, row_group_size=group, compression="snappy")
    column = pq.ParquetFile(path).metadata.row_group(2).column(0)
    start = column.dictionary_page_offset or column.data_page_offset
    raw = bytearray(path.read_bytes())
    raw[start + 40 : start + column.total_compressed_size - 40] = bytes((7 * i + 3) % 256 for i in range(column.total_compressed_size - 80))
    path.write_bytes(bytes(raw))  # footer intact, so the file opens; row group 2's pages are garbage

    items, err = _read_until_error(str(path), tmp_path)
    assert len(items) == 2 * group and [i.data["text"] for i in items] == texts[: 2 * group]
    assert items[-1].origin == f"{path}#{2 * group - 1}"
    line = err.line()
    assert line.startswith(f"MalformedData: {path} is corrupt or truncated: reading it as Parquet failed after {2 * group} rows (")
    assert "\n" not in line


def test_invalid_utf8_lines_are_malformed_rows_not_silently_mangled(tmp_path):
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_bytes(b'{"text": "caf\xc3\xa9 ok"}\n{"text": "bad \xff\xfe byte"}\n{"text": "three"}\n')
    rows, bad = _read(str(jsonl), tmp_path)
    assert [r.data["text"] for r in rows] == ["café ok", "three"]
    assert [(m.origin, m.reason) for m in bad] == [(f"{jsonl}:2", "invalid UTF-8")]
    csv_path = tmp_path / "train.csv"
    csv_path.write_bytes(b'text,label\n"multi\nline \xe9",neg\nfine,pos\n')
    rows, bad = _read(str(csv_path), tmp_path)
    assert [r.data for r in rows] == [{"text": "fine", "label": "pos"}]
    assert [(m.origin, m.reason) for m in bad] == [(f"{csv_path}:3", "invalid UTF-8")]  # a quoted record over lines 2-3
