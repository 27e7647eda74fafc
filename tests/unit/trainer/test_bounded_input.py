"""Bounded input (issue 9 §6): hostile data files end in MalformedData within a memory budget.

Each hostile file is built in tmp at test time, cheaply (a gzip bomb is one compressed member repeated,
a Parquet dictionary bomb is one long value and its indices). Each is read in a subprocess that caps
its own address space a little above what it uses after its imports (a stand-in for the pod's memory
limit: past it an allocation fails instead of the machine swapping) and reports its peak RSS growth
(``ru_maxrss``) while reading, which the test bounds far below what reading the file whole would take.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from finetune_api.spec import DataLimits, DatasetSpec, bytes_quantity, quantity_bytes
from finetune_trainer.data.cleaning import nfkc_expansion
from finetune_trainer.data.limits import row_slices
from finetune_trainer.data.readers import Malformed, read_file

MiB = 1 << 20
HEADROOM = 1 << 30  # address space the reading subprocess may add past its imports
RSS_BUDGET = 96 * MiB  # peak RSS growth allowed while reading one hostile file

_CHILD = """
import json, resource
from pathlib import Path
from finetune_api.spec import DataLimits
from finetune_trainer.errors import TrainerError

def vm_size():
    for line in open("/proc/self/status"):
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024

limit = vm_size() + {headroom}
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = {{"rows": 0, "malformed": 0, "error": None, "message": ""}}
try:
{body}
except TrainerError as exc:
    out["error"], out["message"] = exc.reason, exc.message
except MemoryError:
    out["error"] = "MemoryError"
out["rss_growth"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
print(json.dumps(out))
"""

_READ = """
    from finetune_trainer.data.readers import Malformed, read_file
    for item in read_file(Path({path!r}), limits=DataLimits.model_validate({limits!r})):
        out["malformed" if isinstance(item, Malformed) else "rows"] += 1
"""


def _in_subprocess(body: str) -> dict:
    root = Path(__file__).resolve().parents[3]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(root / p) for p in ("operator", "trainer-image", "devcluster"))}
    code = _CHILD.format(headroom=HEADROOM, body=textwrap.indent(textwrap.dedent(body).strip(), "    "))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _read_bounded(path: Path, **limits: str) -> dict:
    return _in_subprocess(_READ.format(path=str(path), limits=limits))


def _assert_refused(result: dict, *phrases: str) -> None:
    assert result["error"] == "MalformedData", result
    for phrase in phrases:
        assert phrase in result["message"], result["message"]
    assert result["rss_growth"] < RSS_BUDGET, f"peak RSS grew {result['rss_growth'] / MiB:.0f} MiB reading a hostile file"


def _gzip_bomb(path: Path, member_text: bytes, copies: int) -> None:
    """A gzip file of ``copies`` identical members: it decompresses to ``copies * len(member_text)``
    bytes but costs one compression to build (gzip readers read concatenated members as one stream)."""
    member = gzip.compress(member_text, compresslevel=9)
    with path.open("wb") as f:
        for _ in range(copies):
            f.write(member)


# ------------------------------------------------------------------------------ one huge line


def test_a_single_200mb_line_is_malformed_data_read_no_further_than_the_record_cap(tmp_path):
    path = tmp_path / "train.jsonl"
    with path.open("w") as f:
        f.write('{"text": "')
        chunk = "a" * MiB
        for _ in range(200):
            f.write(chunk)
        f.write('"}')  # no line break anywhere
    result = _read_bounded(path)
    _assert_refused(result, str(path), "row at line 1", "longer than 16Mi (dataset.limits.maxRecordBytes)")
    assert result["rows"] == 0


def test_a_csv_record_that_never_closes_its_quote_is_capped_across_lines(tmp_path):
    path = tmp_path / "train.csv"
    with path.open("w") as f:
        f.write('text,label\n"an unclosed quote\n')
        for i in range(100_000):  # 100k short lines, all inside the one quoted field
            f.write(f"line {i} of a field that never ends,x\n")
    result = _read_bounded(path, maxRecordBytes="1Mi")
    _assert_refused(result, "longer than 1Mi (dataset.limits.maxRecordBytes)")


# ------------------------------------------------------------------------------ gzip bombs


def test_gzip_of_2gb_zeros_is_malformed_data_after_reading_one_record_cap(tmp_path):
    path = tmp_path / "bomb.jsonl.gz"
    _gzip_bomb(path, bytes(64 * MiB), 32)  # 2 GiB of zero bytes, about 2 MB on disk
    assert path.stat().st_size < 4 * MiB
    result = _read_bounded(path)
    _assert_refused(result, "bomb.jsonl.gz", "longer than 16Mi (dataset.limits.maxRecordBytes)")


def test_gzip_bomb_of_valid_rows_stops_at_max_file_bytes(tmp_path):
    path = tmp_path / "rows.jsonl.gz"
    _gzip_bomb(path, b'{"text": "again"}\n' * (4 * MiB // 18), 512)  # about 2 GiB of rows
    result = _read_bounded(path, maxFileBytes="4Mi")
    _assert_refused(result, "rows.jsonl.gz holds more than 4Mi (dataset.limits.maxFileBytes) after decompression")
    assert 0 < result["rows"] <= 4 * MiB // 18  # the rows before the cap were read, no more


# ------------------------------------------------------------------------------ JSON arrays


def test_a_million_element_json_array_streams_in_bounded_memory(tmp_path):
    path = tmp_path / "train.json"
    with path.open("w") as f:
        f.write("[")
        f.write(",".join('{"text": "row %d", "label": "x"}' % i for i in range(1_000_000)))
        f.write("]")
    result = _read_bounded(path)
    assert result["error"] is None, result
    assert result["rows"] == 1_000_000
    assert result["rss_growth"] < RSS_BUDGET / 2, f"{result['rss_growth'] / MiB:.0f} MiB"  # json.load takes ~400 MiB


def test_a_json_array_element_over_the_record_cap_is_malformed_data(tmp_path):
    path = tmp_path / "train.json"
    with path.open("w") as f:
        f.write('[{"text": "small"}, {"text": "')
        for _ in range(40):
            f.write("b" * MiB)
        f.write('"}]')
    result = _read_bounded(path, maxRecordBytes="8Mi")
    _assert_refused(result, "element 1 of the JSON array is longer than 8Mi (dataset.limits.maxRecordBytes)")
    assert result["rows"] == 1


def test_an_invalid_json_array_is_malformed_data_after_the_good_elements(tmp_path):
    path = tmp_path / "train.json"
    path.write_text('[{"text": "a"}, {"text": "b"}, {"text": nope}]')
    result = _read_bounded(path)
    assert result["error"] == "MalformedData" and "not a valid JSON array after 2 elements" in result["message"], result
    assert result["rows"] == 2


# ------------------------------------------------------------------------------ Parquet


def _dictionary_bomb(path: Path, value_bytes: int, rows: int) -> None:
    """A Parquet file whose text column is one ``value_bytes`` string, dictionary-encoded, in every row."""
    value = pa.array(["z" * value_bytes])
    column = pa.DictionaryArray.from_arrays(pa.array([0] * rows, type=pa.int32()), value)
    pq.write_table(pa.table({"text": column, "label": ["x"] * rows}), path, compression="zstd")


def test_parquet_dictionary_bomb_over_the_record_cap_is_refused_before_decoding(tmp_path):
    path = tmp_path / "bomb.parquet"
    _dictionary_bomb(path, 17 * MiB, 40)  # 680 MiB decoded, a few KB on disk
    assert path.stat().st_size < MiB
    result = _read_bounded(path)
    _assert_refused(result, "bomb.parquet", "row 0", "longer than 16Mi (dataset.limits.maxRecordBytes)")
    assert result["rows"] == 0


def test_parquet_dictionary_bomb_under_the_record_cap_stops_at_max_file_bytes(tmp_path):
    path = tmp_path / "bomb.parquet"
    _dictionary_bomb(path, MiB, 20_000)  # 20 GiB decoded
    result = _read_bounded(path, maxFileBytes="64Mi")
    _assert_refused(result, "bomb.parquet holds more than 64Mi (dataset.limits.maxFileBytes)")


def test_parquet_whose_metadata_declares_more_than_max_file_bytes_is_refused_unread(tmp_path):
    path = tmp_path / "big.parquet"
    pq.write_table(pa.table({"text": [f"row {i} " * 40 for i in range(20_000)]}), path, use_dictionary=False)
    result = _read_bounded(path, maxFileBytes="1Mi")
    _assert_refused(result, "big.parquet: its Parquet metadata declares more than 1Mi (dataset.limits.maxFileBytes)", "not read")
    assert result["rows"] == 0


def test_parquet_nested_chat_rows_and_nulls_read_within_the_caps(tmp_path):
    messages = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello " * 50}]] * 3000 + [None]
    path = tmp_path / "chat.parquet"
    pq.write_table(pa.table({"messages": messages, "n": list(range(3001))}), path, row_group_size=700)
    result = _read_bounded(path, maxRecordBytes="1Ki")
    assert result["error"] is None and result["rows"] == 3001, result


def test_row_slices_never_exceed_the_budget_but_take_at_least_one_row():
    sizes = np.array([5, 5, 5, 20, 1, 1, 9])
    assert list(row_slices(sizes, 10)) == [(0, 2), (2, 3), (3, 4), (4, 6), (6, 7)]


# ------------------------------------------------------------------------------ NFKC expansion


_PREPARE = """
    from finetune_api.spec import FineTuneJobSpec
    from finetune_trainer.data import prepare_data
    from finetune_trainer.storage import Storage

    class ByteTokenizer:
        eos_token_id, eos_token, chat_template = 0, "\\x00", None
        def __call__(self, texts, add_special_tokens=True, **_):
            return {{"input_ids": [list(t.encode("utf-8")) for t in texts]}}

    spec = FineTuneJobSpec.model_validate({{
        "model": {{"uri": "/models/base"}}, "output": {{"uri": "/out"}}, "hyperparameters": {{"maxSeqLength": 64}},
        "dataset": {{"train": {path!r}, "split": {{"validation": 0, "test": 0}}, "leakageCheck": "off",
                    "preprocessing": {{"maxMalformedFraction": {fraction}}}}},
    }})
    data = prepare_data(spec, Storage(), ByteTokenizer(), cache_dir=Path({cache!r}))
    counts = data.report["inputs"]["train"]
    out["rows"], out["malformed"] = counts["rows_kept"], counts["malformed"]
    out["message"] = counts["malformed_examples"][0]["reason"] if counts["malformed_examples"] else ""
"""


def test_a_row_nfkc_expands_18_fold_is_malformed_data_without_being_normalised(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"text": "\ufdfa" * 1_000_000}, ensure_ascii=False) + "\n")  # 3 MB, 18M characters under NFKC
    result = _in_subprocess(_PREPARE.format(path=str(path), cache=str(tmp_path / "cache"), fraction=0.05))
    _assert_refused(result, "1 of 1 rows", "NFKC makes its text 18.0 times longer", "dataset.limits.maxNormalizationExpansion 4")


def test_one_expanding_row_among_good_ones_is_counted_malformed_and_the_rest_kept(tmp_path):
    path = tmp_path / "train.jsonl"
    rows = [{"text": f"an ordinary row number {i}, café ½"} for i in range(40)] + [{"text": "\ufdfa" * 100_000}]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    result = _in_subprocess(_PREPARE.format(path=str(path), cache=str(tmp_path / "cache"), fraction=0.05))
    assert result["error"] is None, result
    assert (result["rows"], result["malformed"]) == (40, 1)
    assert "maxNormalizationExpansion" in result["message"]


def test_nfkc_expansion_measures_in_chunks():
    assert nfkc_expansion("plain ascii") == 1.0 and nfkc_expansion("") == 1.0
    assert nfkc_expansion("café") == 1.0  # already NFKC
    assert nfkc_expansion("\ufdfa" * 200_000) == pytest.approx(18.0)  # spans several chunks
    assert nfkc_expansion("ﬁ") == 2.0


# ------------------------------------------------------------------------------ the spec


def test_limits_are_quantities_with_safe_defaults_and_explained():
    limits = DatasetSpec.model_validate({"train": "/data"}).limits
    assert (limits.file_bytes, limits.record_bytes, limits.max_normalization_expansion) == (32 << 30, 16 << 20, 4.0)
    assert quantity_bytes("3Ki") == 3072 and bytes_quantity(16 << 20) == "16Mi" and bytes_quantity(1536) == "1536"
    for bad in ("0Ki", "16", "16MB", "-1Mi", "1.5Gi"):
        with pytest.raises(ValueError):
            DataLimits.model_validate({"maxRecordBytes": bad})
    with pytest.raises(ValueError):
        DataLimits.model_validate({"maxNormalizationExpansion": 0.5})
    for name, field in DataLimits.model_fields.items():
        assert "MalformedData" in (field.description or "") or "malformed" in (field.description or ""), name


def test_a_json_array_with_a_byte_order_mark_is_read(tmp_path):
    path = tmp_path / "train.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps([{"text": "a"}, 3]).encode())
    items = list(read_file(path))
    assert [type(i).__name__ for i in items] == ["Row", "Malformed"] and items[0].data == {"text": "a"}
    assert isinstance(items[1], Malformed) and items[1].origin.endswith("train.json[1]")


def test_parquet_is_read_only_for_the_columns_the_format_needs(tmp_path):
    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({"extra": [b"\0" * 1000] * 3, "text": ["a", "b", "c"], "label": ["x", "y", "x"]}), path)
    rows = list(read_file(path, columns=["label", "text", "absent"]))
    assert [r.data for r in rows] == [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}, {"text": "c", "label": "x"}]
    assert [r.data for r in read_file(path, columns=["absent"])] == [{}, {}, {}]  # then each row is missing its column


def test_parquet_rows_averaging_over_the_record_cap_are_refused_from_the_metadata(tmp_path):
    path = tmp_path / "lists.parquet"
    # every row a list of 300k zeros: RLE makes the file tiny, decoded each row is 2.4 MB of int64
    pq.write_table(pa.table({"text": pa.array([[0] * 300_000] * 8, type=pa.list_(pa.int64()))}), path, compression="zstd")
    assert path.stat().st_size < MiB
    result = _read_bounded(path, maxRecordBytes="1Mi")
    _assert_refused(result, "the average row of row group 0", "longer than 1Mi (dataset.limits.maxRecordBytes)")
