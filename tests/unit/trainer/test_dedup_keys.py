"""preprocessing.dedupe.key and dataset.leakageKey: what duplicates and leakage are judged on, example
pairs in the report, and the test-vs-validation and retention-vs-train checks."""

from __future__ import annotations

import random

import pytest
from test_data_pipeline import make_spec, make_tokenizer, prepare, sentence, write_jsonl

from finetune_api.documents import DataReport, undeclared_keys
from finetune_trainer.data import format_report
from finetune_trainer.data.formats import key_text
from finetune_trainer.errors import LeakageDetected

SYSTEM = sentence(random.Random(0), 300)  # one long shared system prompt


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def templated_chats(n: int, seed: int) -> list[dict]:
    """``n`` conversations with the same 300-word system prompt and different questions and answers."""
    rng = random.Random(seed)
    return [
        {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": sentence(rng, 6)}, {"role": "assistant", "content": sentence(rng, 3)}]}
        for _ in range(n)
    ]


def chat_spec(tmp_path, rows, **dataset):
    dataset.setdefault("leakageCheck", "off")
    return make_spec(write_jsonl(tmp_path / "chat.jsonl", rows), "chat", hyper={"maxSeqLength": 512}, **dataset)


def test_key_text_per_choice():
    chat = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
                         {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]}
    assert key_text(chat, "row") == "system: S\nuser: Q1\nassistant: A1\nuser: Q2\nassistant: A2"
    assert key_text(chat, "turns") == "user: Q1\nassistant: A1\nuser: Q2\nassistant: A2"
    assert key_text(chat, "prompt") == "system: S\nuser: Q1\nassistant: A1\nuser: Q2"
    assert key_text(chat, "completion") == "assistant: A1\nassistant: A2"
    assert key_text(chat, "userTurns") == "user: Q1\nuser: Q2"
    assert key_text({"messages": [{"role": "assistant", "content": "A"}]}, "userTurns") == "assistant: A"  # nothing chosen: the row
    pc = {"prompt": "P", "completion": "C"}
    assert [key_text(pc, k) for k in ("row", "turns", "prompt", "userTurns", "completion")] == ["P\nC", "P\nC", "P", "P", "C"]
    assert {key_text({"text": "T"}, k) for k in ("row", "turns", "prompt", "completion", "userTurns")} == {"T"}


def test_shared_system_prompt_is_not_a_near_duplicate_by_default(tmp_path, tokenizer):
    rows = templated_chats(50, seed=1)
    data = prepare(chat_spec(tmp_path, rows), tokenizer, tmp_path)
    counts = data.report["inputs"]["train"]
    assert (counts["near_duplicates"], counts["exact_duplicates"], counts["rows_kept"]) == (0, 0, 50)
    assert data.report["preprocessing"]["dedupe"]["key"] == "turns"


def test_key_row_collapses_the_templated_rows_and_reports_pairs(tmp_path, tokenizer):
    rows = templated_chats(50, seed=1)
    rows[7]["messages"][1]["content"] += " mail me at jo@example.com"
    data = prepare(chat_spec(tmp_path, rows, preprocessing={"dedupe": {"key": "row"}}), tokenizer, tmp_path)
    counts = data.report["inputs"]["train"]
    assert (counts["near_duplicates"], counts["rows_kept"]) == (49, 1)
    pairs = counts["duplicate_examples"]
    assert len(pairs) == 5 and {p["match"] for p in pairs} == {"near"}
    first = pairs[0]
    assert first["row"].endswith("chat.jsonl:2") and first["duplicate_of"].endswith("chat.jsonl:1")
    assert first["text"].startswith("system: " + SYSTEM[:40].casefold()) and first["duplicate_of_text"].startswith("system: ")
    assert 0.85 <= first["similarity"] < 1.0
    report = DataReport.model_validate(data.report)
    assert undeclared_keys(report) == [] and report.inputs["train"].duplicate_examples[0].match == "near"


def test_duplicate_pairs_are_redacted(tmp_path, tokenizer):
    rng = random.Random(5)
    base = sentence(rng, 30)
    edited = " ".join(base.split()[1:])  # the first word dropped: a near duplicate
    rows = [{"text": base + " a.b@example.com"}, {"text": edited + " c.d@example.org"}, {"text": "w1 w2 w3"}, {"text": "W1  w2 w3"}]
    data = prepare(make_spec(write_jsonl(tmp_path / "t.jsonl", rows), leakageCheck="off"), tokenizer, tmp_path)
    pairs = {p["match"]: p for p in data.report["inputs"]["train"]["duplicate_examples"]}
    assert pairs["exact"]["row"].endswith("t.jsonl:4") and pairs["exact"]["duplicate_of"].endswith("t.jsonl:3") and pairs["exact"]["similarity"] == 1.0
    assert pairs["exact"]["text"] == pairs["exact"]["duplicate_of_text"] == "w1 w2 w3"
    near = pairs["near"]
    assert near["row"].endswith("t.jsonl:2") and near["duplicate_of"].endswith("t.jsonl:1")
    assert near["text"] == edited.casefold() + " [email]" and near["duplicate_of_text"] == base.casefold() + " [email]"
    assert "example" not in near["text"] + near["duplicate_of_text"]


def test_leakage_key_turns_ignores_the_shared_system_prompt(tmp_path, tokenizer):
    train, val = templated_chats(40, seed=2), templated_chats(10, seed=3)
    common = {"validation": write_jsonl(tmp_path / "val.jsonl", val), "leakageCheck": "fail"}
    data = prepare(chat_spec(tmp_path, train, **common), tokenizer, tmp_path)
    assert (data.report["leakage"]["key"], data.report["leakage"]["total"], len(data.validation)) == ("turns", 0, 10)
    with pytest.raises(LeakageDetected, match=r"^10 validation/test examples also appear in train \(validation: 0 exact, 10 near\)"):
        prepare(chat_spec(tmp_path, train, leakageKey="row", **common), tokenizer, tmp_path)


def test_test_found_in_validation_and_retention_found_in_train(tmp_path, tokenizer):
    rng = random.Random(11)
    train = [sentence(rng, 20) for _ in range(20)]
    val = [sentence(rng, 20) for _ in range(5)]
    test = [sentence(rng, 20) for _ in range(4)] + [val[2], train[0]]  # one from validation, one from train
    retention = [sentence(rng, 20) for _ in range(3)] + [train[4].upper()]
    files = {
        "validation": write_jsonl(tmp_path / "val.jsonl", [{"text": t} for t in val]),
        "test": write_jsonl(tmp_path / "test.jsonl", [{"text": t} for t in test]),
        "evaluation": {"retention": {"dataset": write_jsonl(tmp_path / "ret.jsonl", [{"text": t} for t in retention])}},
    }
    train_uri = write_jsonl(tmp_path / "train.jsonl", [{"text": t} for t in train])

    data = prepare(make_spec(train_uri, leakageCheck="warn", **files), tokenizer, tmp_path)
    leakage = data.report["leakage"]
    assert (leakage["test"]["exact"], leakage["test_vs_validation"]["exact"], leakage["retention"]["exact"]) == (1, 1, 1)
    assert (leakage["validation"]["total"], leakage["total"], leakage["all_checks_total"]) == (0, 1, 3)
    [in_validation] = leakage["test_vs_validation"]["examples"]
    assert (in_validation["row"].endswith("test.jsonl:5"), in_validation["matched_split"], in_validation["matched_row"].endswith("val.jsonl:3")) == (True, "validation", True)
    assert in_validation["text"] == in_validation["matched_text"] == val[2].casefold()
    [in_train] = leakage["retention"]["examples"]
    assert (in_train["split"], in_train["matched_row"].endswith("train.jsonl:5")) == ("retention", True)
    assert "test in validation 1 exact" in format_report(data.report)

    with pytest.raises(LeakageDetected, match=r"^3 evaluation examples also appear in train or validation \(test: 1 exact, 0 near, test in validation: 1 exact, 0 near, retention: 1 exact, 0 near\)"):
        prepare(make_spec(train_uri, leakageCheck="fail", **files), tokenizer, tmp_path)

    data = prepare(make_spec(train_uri, leakageCheck="drop", **files), tokenizer, tmp_path)
    assert (len(data.train), len(data.validation), len(data.test), len(data.retention)) == (20, 5, 4, 3)
    assert (data.report["leakage"]["test"]["dropped"], data.report["leakage"]["test_vs_validation"]["dropped"], data.report["leakage"]["retention"]["dropped"]) == (1, 1, 1)
    assert undeclared_keys(DataReport.model_validate(data.report)) == []
