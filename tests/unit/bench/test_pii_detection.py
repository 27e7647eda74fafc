"""bench/pii_detection.py: the labelled set is deterministic and the scoring counts what it says."""

from __future__ import annotations

import pii_detection as bench

from finetune_trainer.data.pii import Span


def test_the_set_is_deterministic_and_labels_point_at_the_pii():
    a, b = bench.build_set(3, 5), bench.build_set(3, 5)
    assert a == b and len(a) == 5 * 10 + 4 * 5
    for text, gold in a:
        for kind, start, end in gold:
            assert 0 <= start < end <= len(text) and text[start:end].strip() == text[start:end]


def test_scoring_counts_true_and_false_positives_per_kind():
    lines = [("mail a@b.io now", [("EMAIL", 5, 11)]), ("pin foo==1.2.3.4", []), ("Dear Ann Lee", [("PERSON_NAME", 5, 12)])]
    found = {"mail a@b.io now": [Span(5, 11, "EMAIL")], "pin foo==1.2.3.4": [Span(9, 16, "IP")], "Dear Ann Lee": []}
    r = bench.score(lines, lambda text: found[text])
    assert r["per_kind"]["EMAIL"] == {"support": 1, "tp": 1, "fp": 0, "fn": 0, "precision": 1.0, "recall": 1.0, "redaction_recall": 1.0}
    assert r["per_kind"]["IP"]["fp"] == 1 and r["per_kind"]["IP"]["precision"] == 0.0
    assert r["per_kind"]["PERSON_NAME"]["recall"] == 0.0
    assert r["negatives_redacted"] == 1.0


def test_the_old_regexes_redact_a_version_pin_and_ours_do_not():
    from finetune_trainer.data.pii import find

    assert [s.kind for s in bench.old_find("pip install foo==1.2.3.4")] == ["IP"]
    assert find("pip install foo==1.2.3.4") == []
