"""Classification rows with the same text and different labels: a data error, counted and reported, with
the spec's choice of drop (default), keepFirst or fail."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_data_pipeline import make_spec, make_tokenizer, prepare, write_jsonl

from finetune_api.documents import DataReport, undeclared_keys
from finetune_trainer.data import format_report
from finetune_trainer.errors import MalformedData

ROWS = [
    {"text": "w1 w2 w3 mail a.b@example.com", "label": "pos"},  # 1: conflicts with row 3 (case/spacing differ)
    {"text": "w4 w5", "label": "neg"},
    {"text": "W1  w2 w3 mail a.b@example.com", "label": "neg"},  # 3
    {"text": "w6 w7", "label": "pos"},
    {"text": "w4 w5", "label": "neg"},  # 5: an ordinary exact duplicate of row 2 (same label)
    {"text": "w1 w2 w3 mail a.b@example.com", "label": "pos"},  # 6: same text, the first row's label
    {"text": "w8 w9", "label": "neg"},
]


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def _run(tmp_path: Path, tokenizer, **pre):
    spec = make_spec(write_jsonl(tmp_path / "c.jsonl", ROWS), "classification", preprocessing=pre, leakageCheck="off")
    return prepare(spec, tokenizer, tmp_path)


def _texts(data, tokenizer) -> list[str]:
    return [tokenizer.decode(ids) for ids in data.train["input_ids"]]


def test_default_drops_every_row_of_a_conflicting_text_and_reports_redacted_examples(tmp_path, tokenizer):
    data = _run(tmp_path, tokenizer)
    counts = data.report["inputs"]["train"]
    # Rows 1 and 3 conflict; row 6 (same text) is counted as an exact duplicate of row 1 before row 1 goes.
    assert (counts["label_conflicts"], counts["exact_duplicates"], counts["rows_kept"]) == (2, 2, 3)
    assert counts["rows_read"] == sum(counts[k] for k in ("malformed", "empty", "label_conflicts", "exact_duplicates", "near_duplicates", "too_short", "too_long", "no_trainable_tokens", "rows_kept"))
    assert _texts(data, tokenizer) == ["w4 w5", "w6 w7", "w8 w9"]
    assert data.train["label"] == [data.labels.index("neg"), data.labels.index("pos"), data.labels.index("neg")]
    [example] = counts["label_conflict_examples"]
    assert example["row"].endswith("c.jsonl:3") and example["labels"] == ["pos", "neg"]
    assert "[email]" in example["text"] and "example.com" not in example["text"]
    assert data.report["total"]["label_conflicts"] == 2
    assert counts["tokens"] == sum(len(ids) for ids in data.train["input_ids"])  # the dropped row's tokens are gone
    assert "label conflicts 2" in format_report(data.report)
    report = DataReport.model_validate(json.loads(json.dumps(data.report)))
    assert undeclared_keys(report) == [] and report.inputs["train"].label_conflicts == 2
    # ...and in the summary the trainer puts into progress.json (status.data) and the metrics
    from finetune_trainer.data.report import summary
    from finetune_trainer.metrics import DATA_COUNTERS
    assert summary(data.report).label_conflicts == 2 and "label_conflicts" in DATA_COUNTERS


def test_keep_first_keeps_the_first_label(tmp_path, tokenizer):
    data = _run(tmp_path, tokenizer, labelConflicts="keepFirst")
    counts = data.report["inputs"]["train"]
    assert (counts["label_conflicts"], counts["exact_duplicates"], counts["rows_kept"]) == (1, 2, 4)
    assert _texts(data, tokenizer)[0].startswith("w1 w2 w3")
    assert data.train["label"][0] == data.labels.index("pos")


def test_fail_is_malformed_data_naming_the_rows(tmp_path, tokenizer):
    with pytest.raises(MalformedData, match=r"1 texts of train data .* with different labels \(1 conflicting rows\); e\.g\. row .*c\.jsonl:3 has label 'neg' .* 'pos'.*labelConflicts"):
        _run(tmp_path, tokenizer, labelConflicts="fail")


def test_without_exact_dedupe_conflicts_are_still_dropped(tmp_path, tokenizer):
    data = _run(tmp_path, tokenizer, dedupe={"exact": False, "near": False})
    counts = data.report["inputs"]["train"]
    assert (counts["label_conflicts"], counts["exact_duplicates"], counts["rows_kept"]) == (3, 0, 4)
    assert _texts(data, tokenizer) == ["w4 w5", "w6 w7", "w4 w5", "w8 w9"]
