"""dataset.crossValidation without training: the folds (seeded, stratified, a partition of the non-test rows),
the leakage rule per fold, the mean/std summary, the spec's rules and the model card section."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
from pydantic import ValidationError

from finetune_api.documents import DataReport, undeclared_keys
from finetune_api.spec import FineTuneJobSpec
from finetune_trainer.crossval import card_markdown, summarise
from finetune_trainer.data.folds import fold_indices
from finetune_trainer.errors import EmptyDataset, LeakageDetected
from test_data_pipeline import classification_rows, make_spec, make_tokenizer, minilm, prepare, sentence, write_jsonl  # noqa: F401


def test_fold_indices_partition_deterministic_and_stratified():
    labels = np.array([0] * 60 + [1] * 30 + [2] * 9)
    folds, fallback = fold_indices(len(labels), 3, seed=7, stratify_labels=labels)
    assert fallback is None and len(folds) == 3
    validations = [v for _, v in folds]
    assert sorted(np.concatenate(validations).tolist()) == list(range(99))  # every row validates exactly once
    for train, val in folds:
        assert set(train).isdisjoint(val) and len(train) + len(val) == 99
        assert Counter(labels[val].tolist()) == {0: 20, 1: 10, 2: 3}  # the class proportions in every fold
    again, _ = fold_indices(len(labels), 3, seed=7, stratify_labels=labels)
    assert all((a[1] == b[1]).all() for a, b in zip(folds, again))
    other, _ = fold_indices(len(labels), 3, seed=8, stratify_labels=labels)
    assert any((a[1] != b[1]).any() for a, b in zip(folds, other))


def test_fold_indices_fall_back_to_kfold_for_a_rare_class_and_refuse_too_few_rows():
    labels = np.array([0] * 20 + [1] * 2)
    folds, fallback = fold_indices(22, 3, seed=0, stratify_labels=labels)
    assert "rarest class has 2 rows" in fallback and sorted(np.concatenate([v for _, v in folds]).tolist()) == list(range(22))
    with pytest.raises(EmptyDataset, match="2 training rows are too few for dataset.crossValidation.folds 3"):
        fold_indices(2, 3, seed=0)


def test_prepared_folds_leave_the_test_split_out_and_are_stratified(minilm, tmp_path):
    rows = classification_rows({"a": 60, "b": 30}, seed=11)
    spec = make_spec(write_jsonl(tmp_path / "cls.jsonl", rows), "classification", split={"validation": 0.3, "test": 0.1, "seed": 3},
                     crossValidation={"folds": 3}, preprocessing={"dedupe": {"near": False}}, hyper={"maxSeqLength": 128})
    data = prepare(spec, minilm, tmp_path)
    assert data.validation is None and (len(data.train), len(data.test)) == (81, 9)  # split.validation is not used
    assert sorted(i for f in data.folds for i in f.validation) == list(range(81))
    train_ids = [tuple(r) for r in data.train["input_ids"]]
    test_ids = {tuple(r) for r in data.test["input_ids"]}
    assert test_ids.isdisjoint(train_ids)  # no test row in any fold (folds index the train rows only)
    labels = np.array(data.train["label"])
    for fold in data.folds:
        assert set(fold.train).isdisjoint(fold.validation) and len(fold.train) + len(fold.validation) == 81
        assert Counter(labels[fold.validation].tolist()) == {0: 18, 1: 9}
    assert undeclared_keys(DataReport.model_validate(data.report)) == []  # every key of the cross_validation section is declared
    cv = DataReport.model_validate(data.report).cross_validation
    assert cv.stratified and cv.folds == 3 and [f.validation_rows for f in cv.fold_reports] == [27, 27, 27]
    again = prepare(spec, minilm, tmp_path / "again")
    assert [f.validation for f in again.folds] == [f.validation for f in data.folds]


def _near_pairs(tmp_path):
    """40 distinct rows plus near-duplicates of rows 0..5 (the last word changed): dedupe.near off keeps them."""
    rng = random.Random(5)
    texts = [sentence(rng, 24) for _ in range(40)]
    texts += [" ".join(t.split()[:-1] + ["w399"]) for t in texts[:6]]
    return write_jsonl(tmp_path / "near.jsonl", [{"text": t} for t in texts])


def _cv_spec(train, policy):
    return make_spec(train, crossValidation={"folds": 2}, leakageCheck=policy, split={"validation": 0.0, "test": 0.0, "seed": 1},
                     preprocessing={"dedupe": {"near": False}, "redactPii": False})


def test_leakage_rule_per_fold(tmp_path):
    tokenizer = make_tokenizer()
    train = _near_pairs(tmp_path)
    warned = prepare(_cv_spec(train, "warn"), tokenizer, tmp_path / "warn")
    assert undeclared_keys(DataReport.model_validate(warned.report)) == []
    per_fold = DataReport.model_validate(warned.report).cross_validation.fold_reports
    leaked = [f.leakage.total for f in per_fold]
    # A pair split across the two folds leaks in both directions; one inside a fold in neither.
    pair_folds = [{k for k, f in enumerate(warned.folds) if i in f.validation} | {k for k, f in enumerate(warned.folds) if 40 + i in f.validation}
                  for i in range(6)]
    split_pairs = sum(len(s) == 2 for s in pair_folds)
    assert split_pairs > 0 and leaked == [split_pairs, split_pairs]
    assert all(e.match == "near" for f in per_fold for e in f.leakage.examples)

    dropped = prepare(_cv_spec(train, "drop"), tokenizer, tmp_path / "drop")
    for fold, report in zip(dropped.folds, DataReport.model_validate(dropped.report).cross_validation.fold_reports):
        assert report.leakage.dropped == split_pairs and len(fold.validation) == 23 - split_pairs
    with pytest.raises(LeakageDetected, match=r"validation rows of cross-validation fold 1 also appear in its training folds \(0 exact, \d+ near\)"):
        prepare(_cv_spec(train, "fail"), tokenizer, tmp_path / "fail")


def test_summary_mean_and_std_are_numpys():
    results = [{"fold": k, "trainRows": 10, "validationRows": 5, "steps": 4, "metrics": {"eval_loss": loss, "accuracy": acc}}
               for k, (loss, acc) in enumerate([(0.5, 0.8), (0.7, 0.6), (0.3, 1.0)], start=1)]
    summary = summarise(results, 3, stratified=True)
    assert summary.mean == {"eval_loss": pytest.approx(np.mean([0.5, 0.7, 0.3])), "accuracy": pytest.approx(0.8)}
    assert summary.std["eval_loss"] == pytest.approx(np.std([0.5, 0.7, 0.3])) and summary.std["accuracy"] == pytest.approx(np.std([0.8, 0.6, 1.0]))
    text = card_markdown(summary.wire())
    assert "## Cross-validation" in text and "3-fold stratified" in text and "| accuracy | 0.8 | 0.1633 | 0.8 | 0.6 | 1 |" in text
    assert summarise([], 3, stratified=False).mean is None


BASE = {"model": {"uri": "/m", "task": "sequence-classification"}, "output": {"uri": "/out"}}


def test_spec_rules():
    ok = FineTuneJobSpec.model_validate({**BASE, "dataset": {"train": "/d", "format": "classification", "crossValidation": {"folds": 5}}})
    assert ok.dataset.cross_validation.stratify is True
    with pytest.raises(ValidationError, match="remove dataset.validation"):
        FineTuneJobSpec.model_validate({**BASE, "dataset": {"train": "/d", "format": "classification", "validation": "/v", "crossValidation": {"folds": 3}}})
    with pytest.raises(ValidationError, match="checkpoint.resume must be latest or none"):
        FineTuneJobSpec.model_validate({**BASE, "dataset": {"train": "/d", "format": "classification", "crossValidation": {"folds": 3}},
                                        "checkpoint": {"resume": "s3://b/run/checkpoints/step-00000010"}})
    for bad in (1, 21):
        with pytest.raises(ValidationError):
            FineTuneJobSpec.model_validate({**BASE, "dataset": {"train": "/d", "format": "classification", "crossValidation": {"folds": bad}}})


def test_folds_survive_the_per_node_hand_over(tmp_path):
    """Local rank 0 publishes the prepared data for the pod's other processes: they must get the same folds."""
    from finetune_trainer.data import shared
    from finetune_trainer.storage import Storage

    spec = _cv_spec(_near_pairs(tmp_path), "drop")
    published = shared._prepare_and_publish(spec, Storage(), make_tokenizer(), tmp_path, tmp_path / "node")
    loaded = shared._load(tmp_path / "node")
    assert loaded.folds == published.folds and len(loaded.folds) == 2
    assert loaded.report["cross_validation"] == published.report["cross_validation"]
