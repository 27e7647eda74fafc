"""Cleaning, duplicate index, splits and label helpers as units."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest

from finetune_trainer.data.cleaning import DuplicateIndex, dedupe_key, key_hash, normalize_aggressive, shingles, signature, signatures
from finetune_trainer.data.formats import parse_record
from finetune_trainer.data.labels import class_balance, inverse_frequency_weights, resolve_labels, sort_labels
from finetune_trainer.data.splits import split_indices
from finetune_trainer.errors import InvalidConfig
from finetune_api.spec import FieldNames

WORDS = [f"w{i}" for i in range(500)]


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def test_normalize_aggressive():
    assert normalize_aggressive("  ﬁne  ＡＢＣ\t\ttabs  ") == "fine ABC tabs"  # NFKC folds ligature and full-width
    assert normalize_aggressive("a\u200bb\u00adc") == "abc"  # zero-width and soft hyphen removed
    assert normalize_aggressive("line one   \r\nline two\n\n\n\n\nline three") == "line one\nline two\n\nline three"
    assert normalize_aggressive("bell\x07 char") == "bell char"


def test_dedupe_key_ignores_case_and_spacing():
    assert dedupe_key("Hello   World\n") == dedupe_key("hello world") == "hello world"
    assert key_hash(dedupe_key("A b")) == key_hash(dedupe_key("a  B"))
    assert key_hash("a b") != key_hash("a c")


def test_shingles_are_word_5_grams():
    assert shingles("a b c d e f") == [b"a b c d e", b"b c d e f"]
    assert shingles("too short") == [b"too short"]


def test_near_duplicate_threshold_semantics():
    rng = random.Random(0)
    index = DuplicateIndex(near_threshold=0.85)
    long_text = sentence(rng, 40)
    short_text = sentence(rng, 12)
    for text in (long_text, short_text):
        index.add(key_hash(text), signature(text))
    words = long_text.split()
    # Last word changed: 1 of 36 shingles differs, Jaccard 35/37 ~ 0.95 -> near duplicate of row 0.
    assert index.near_match(signature(" ".join(words[:-1] + ["changed"]))) == 0
    # Middle word changed in a 12-word text: 5 of 8 shingles differ, Jaccard 3/13 -> not a duplicate.
    short = short_text.split()
    assert index.near_match(signature(" ".join(short[:6] + ["changed"] + short[7:]))) is None
    assert index.near_match(signature(sentence(rng, 40))) is None
    assert index.exact_match(key_hash(long_text)) == 0
    assert index.exact_match(key_hash(short_text)) == 1


def test_signature_is_deterministic():
    assert np.array_equal(signature("the same text every time"), signature("the same text every time"))
    assert signature("x").dtype == np.uint32 and signature("x").shape == (128,)


def test_signatures_are_the_minhash_of_the_shingle_set():
    """The batch signatures (unsorted str shingles with repeats) equal rensa's MinHash of :func:`shingles`' set."""
    from rensa import RMinHash

    rng = random.Random(4)
    keys = [sentence(rng, n) for n in (1, 3, 5, 12, 60)] + ["a b a b a b a b a b", "", "ünïcode wörds here and there"]
    for key, sig in zip(keys, signatures(keys)):
        reference = RMinHash(num_perm=128, seed=1)
        reference.update(shingles(key))
        assert sig.tolist() == reference.digest()


def test_stratified_split_keeps_class_proportions():
    labels = [0] * 60 + [1] * 30 + [2] * 10
    plan = split_indices(100, validation=0.2, test=0.1, seed=7, stratify_labels=labels)
    y = np.asarray(labels)
    assert Counter(y[plan.test].tolist()) == {0: 6, 1: 3, 2: 1}
    assert Counter(y[plan.validation].tolist()) == {0: 12, 1: 6, 2: 2}
    assert Counter(y[plan.train].tolist()) == {0: 42, 1: 21, 2: 7}
    assert plan.info["stratified"] is True
    everything = np.concatenate([plan.train, plan.validation, plan.test])
    assert sorted(everything.tolist()) == list(range(100))  # a partition
    assert list(plan.train) == sorted(plan.train)  # file order kept


def test_split_is_seeded():
    a = split_indices(50, validation=0.2, test=0.0, seed=1)
    b = split_indices(50, validation=0.2, test=0.0, seed=1)
    c = split_indices(50, validation=0.2, test=0.0, seed=2)
    assert a.test is None
    assert np.array_equal(a.validation, b.validation)
    assert not np.array_equal(a.validation, c.validation)
    assert len(a.validation) == 10


def test_stratify_falls_back_when_a_class_is_too_rare():
    labels = [0] * 19 + [1]
    plan = split_indices(20, validation=0.2, test=0.0, seed=0, stratify_labels=labels)
    assert plan.info["stratified"] is False
    assert "stratify_fallback" in plan.info
    assert len(plan.validation) == 4


def test_labels_from_data_sort_numerically_and_check_num_labels():
    assert sort_labels({"10", "2", "1"}) == ["1", "2", "10"]
    assert sort_labels({"pos", "neg", "neutral"}) == ["neg", "neutral", "pos"]
    assert resolve_labels(["b", "a"], None, {"a"}) == (["b", "a"], "spec")
    assert resolve_labels(None, None, {"b", "a"}) == (["a", "b"], "data")
    with pytest.raises(InvalidConfig, match="numLabels is 3"):
        resolve_labels(None, 3, {"a", "b"})


def test_class_balance_and_weights():
    counts = Counter({"a": 60, "b": 30, "c": 10})
    balance = class_balance(counts, ["a", "b", "c", "d"])
    assert balance["counts"] == {"a": 60, "b": 30, "c": 10, "d": 0}
    assert balance["imbalance_ratio"] == 6.0
    assert balance["classes_without_rows"] == ["d"]
    weights = inverse_frequency_weights(counts, ["a", "b", "c"])
    assert weights == pytest.approx([100 / 180, 100 / 90, 100 / 30])


def test_parse_record_per_format():
    fields = FieldNames()
    assert parse_record({"text": "hi"}, "text", fields) == {"text": "hi"}
    assert parse_record({"txt": "hi"}, "text", fields) == "missing column 'text'"
    assert parse_record({"text": "t", "label": 1.0}, "classification", fields) == {"text": "t", "label": "1"}
    assert parse_record({"text": "t"}, "classification", fields) == "missing or invalid label column 'label'"
    assert parse_record({"prompt": "p", "completion": "c"}, "prompt-completion", fields) == {"prompt": "p", "completion": "c"}
    assert parse_record({"prompt": "p"}, "prompt-completion", fields) == "missing column 'completion'"
    chat = '[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]'  # as a CSV cell
    assert parse_record({"messages": chat}, "chat", fields) == {
        "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    }
    assert parse_record({"messages": [{"content": "x"}]}, "chat", fields) == "message 0 has no role"
    custom = FieldNames(text="body", label="y")
    assert parse_record({"body": "b", "y": "pos"}, "classification", custom) == {"text": "b", "label": "pos"}
