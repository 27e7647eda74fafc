"""Honest baselines: the encoder with its untrained head is named for what it is (random_head), the fair
no-fine-tune baselines are measured (a linear probe on frozen features for encoders, k-shot prompting for
causal LMs), the headline gain compares test with test, and calibration is reported on test before and after."""

from __future__ import annotations

import pytest
import torch

from finetune_trainer.calibration import expected_calibration_error, scaled_on
from finetune_trainer.collate import eval_loader
from finetune_trainer.evaluate import evaluate_classification, frozen_features, linear_probe
from finetune_trainer.generation import FewShot, prompt_spans
from finetune_trainer.report import _gain
from helpers_assets import minilm_dir, sentiment_rows
from test_generation import tiny_llama  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def minilm():
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    path = minilm_dir()
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval(), AutoTokenizer.from_pretrained(path)


def _classification_loader(tokenizer, rows):
    import datasets

    names = ["negative", "positive"]
    ds = datasets.Dataset.from_list([{"input_ids": tokenizer(r["text"])["input_ids"], "label": names.index(r["label"])} for r in rows])
    return eval_loader(ds, classification=True, batch_size=16, pad_token_id=tokenizer.pad_token_id), names


def test_linear_probe_on_frozen_minilm_features_beats_the_random_head(minilm):
    """The pretrained MiniLM with a fresh head scores about chance (what the report used to call "base model");
    logistic regression on its frozen features is the baseline a fine-tune must beat, and here it is strong."""
    model, tokenizer = minilm
    rows = sentiment_rows(160, seed=11)
    train, test = rows[:100], rows[100:]
    train_loader, names = _classification_loader(tokenizer, train)
    test_loader, _ = _classification_loader(tokenizer, test)

    random_head = evaluate_classification(model, test_loader, num_labels=2, label_names=names)
    x_train, y_train = frozen_features(model, train_loader)
    x_test, y_test = frozen_features(model, test_loader)
    assert x_train.shape == (100, model.config.hidden_size) and y_test.tolist() == [names.index(r["label"]) for r in test]
    probe = linear_probe(x_train, y_train, x_test, y_test, names, seed=0)

    assert random_head["accuracy"] < 0.75
    assert probe["accuracy"] >= 0.9 and probe["accuracy"] > random_head["accuracy"] + 0.2
    assert probe["eval_samples"] == 60 and probe["train_samples"] == 100
    assert set(probe) >= {"eval_loss", "f1_macro", "ece", "per_class"}
    # Mean pooling ignores padding: a row's features do not depend on what it is batched with.
    alone, _ = frozen_features(model, _classification_loader(tokenizer, test[:1])[0])
    torch.testing.assert_close(alone[0], x_test[0], atol=1e-4, rtol=1e-4)


def test_linear_probe_needs_two_classes():
    x = torch.randn(6, 4)
    assert linear_probe(x, torch.zeros(6, dtype=torch.long), x, torch.zeros(6, dtype=torch.long), ["a", "b"]) is None


# ------------------------------------------------------------------------------------------------- k-shot


class _Tok:
    """The two attributes and the one call FewShot reads from a tokenizer (ids only: no text involved)."""

    bos_token_id, eos_token_id = 1, 2

    def __call__(self, text, add_special_tokens=False):
        assert text == "\n\n" and add_special_tokens is False
        return {"input_ids": [9]}


def _train_rows(n: int = 20) -> list[dict[str, list[int]]]:
    rows = []
    for i in range(n):
        prompt, completion = [1, 100 + i, 200 + i], [300 + i, 2]  # BOS prompt | completion EOS
        rows.append({"input_ids": prompt + completion, "labels": [-100] * len(prompt) + completion})
    rows[3] = {"input_ids": [1, 5, 6], "labels": [1, 5, 6]}  # plain text: no prompt, never a demonstration
    return rows


def test_k_shot_prompt_is_built_from_train_rows_drawn_with_the_seed():
    train = _train_rows()
    a = FewShot.from_train(train, _Tok(), k=4, seed=7)
    assert a.k == 4 and len(set(a.train_rows)) == 4 and 3 not in a.train_rows
    assert FewShot.from_train(train, _Tok(), k=4, seed=7) == a
    assert FewShot.from_train(train, _Tok(), k=4, seed=8).train_rows != a.train_rows
    # Each demonstration is its training row's prompt and completion, without the inner BOS and the closing EOS.
    for index, demo in zip(a.train_rows, a.demonstrations):
        prompt, reference = prompt_spans(train[index]["input_ids"], train[index]["labels"])
        assert list(demo) == prompt[1:] + reference[:-1]
    ids, used = a.prompt([1, 150, 151])
    expected = [1]
    for demo in a.demonstrations:
        expected += list(demo) + [9]
    assert (ids, used) == (expected + [150, 151], 4)
    # Too long for maxSeqLength: the first demonstrations go, the prompt stays whole.
    short, used = a.prompt([1, 150, 151], max_length=1 + 2 * 4 + 2)
    assert used == 2 and short[-2:] == [150, 151] and short[0] == 1 and len(short) == 11
    assert FewShot.from_train(train, _Tok(), k=0, seed=7) is None  # evaluation.fewShotExamples 0 disables it
    assert FewShot.from_train(train[3:4], _Tok(), k=2, seed=7) is None  # no row with a prompt


def test_k_shot_chat_demonstrations_keep_the_end_of_turn_token():
    a = FewShot.from_train(_train_rows(), _Tok(), k=2, seed=1, keep_eos=True)
    assert all(demo[-1] == 2 for demo in a.demonstrations)


# ---------------------------------------------------------------------------------- gain and calibration


def test_the_headline_gain_compares_test_with_test():
    """Before: baseline and final were both validation numbers, and validation also chose the checkpoint."""
    baseline = {"split": "test", "reference": "random_head", "random_head": {"accuracy": 0.5, "eval_loss": 0.7},
                "linear_probe": {"accuracy": 0.85}, "majority_class": {"accuracy": 0.55}}
    test = {"accuracy": 0.8, "eval_loss": 0.4}
    g = _gain(baseline, test, "test", "eval_loss", "min", classification=True)
    assert g == {"metric": "accuracy", "baseline": 0.5, "final": 0.8, "delta": pytest.approx(0.3), "relative": pytest.approx(0.6),
                 "improved": True, "split": "test", "baseline_kind": "random_head"}
    # Numbers from different splits are never compared; nor a flat baseline an older trainer checkpointed.
    assert _gain(baseline, test, "validation", "eval_loss", "min", classification=True) is None
    assert _gain({"accuracy": 0.5}, test, "test", "eval_loss", "min", classification=True) is None


def test_calibration_on_test_before_and_after_temperature_scaling():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (400,), generator=g)
    logits = torch.randn(400, 3, generator=g, dtype=torch.float64)
    logits[torch.arange(400), labels] += 1.0
    logits *= 4.0  # overconfident
    result = scaled_on(logits, labels, 4.0, prefix="test_")
    assert set(result) == {"test_ece_before", "test_ece_after", "test_nll_before", "test_nll_after"}
    assert result["test_ece_before"] == pytest.approx(expected_calibration_error(logits.softmax(1), labels))
    assert result["test_ece_after"] < result["test_ece_before"] and result["test_nll_after"] < result["test_nll_before"]



def test_without_a_test_set_every_baseline_and_the_gain_are_on_validation(tiny_llama):
    """measure_baseline and final_report through a real Evaluator: no test set, so the comparison split is validation,
    capped at maxEvalSamples like the validation loader, and the k-shot prompts come from seeded training rows."""
    import datasets
    from accelerate import Accelerator

    from finetune_api.spec import FineTuneJobSpec
    from finetune_trainer.data.prepare import PreparedData
    from finetune_trainer.distributed import DistInfo
    from finetune_trainer.evaluator import Evaluator
    from finetune_trainer.report import final_report, measure_baseline
    from finetune_trainer.state import TrainerState
    from test_generation import _chat_rows, _tokenizer

    tokenizer = _tokenizer()
    rows, _ = _chat_rows(tokenizer, n=12)
    train, validation = datasets.Dataset.from_list(rows[:8]), datasets.Dataset.from_list(rows[8:] + rows[:4])
    spec = FineTuneJobSpec.model_validate({
        "model": {"uri": "/m"}, "dataset": {"train": "/t.jsonl", "format": "chat"}, "output": {"uri": "/out"},
        "hyperparameters": {"batchSize": 2, "maxSeqLength": 64, "seed": 5},
        "evaluation": {"metrics": ["rouge"], "maxEvalSamples": 6, "fewShotExamples": 2},
    })
    data = PreparedData(train=train, validation=validation, test=None, retention=None, labels=None, class_weights=None, report={})
    evaluator = Evaluator(spec, DistInfo(), accelerator=Accelerator(cpu=True), tokenizer=tokenizer, data=data, num_labels=None,
                          model=tiny_llama, sharded=False)
    baseline, retention_before = measure_baseline(evaluator)
    assert retention_before is None
    assert (baseline["split"], baseline["reference"], baseline["k"]) == ("validation", "base_model", 2)
    assert baseline["base_model"]["generation_samples"] == baseline["k_shot"]["generation_samples"] == 6  # the 6 capped rows
    assert baseline["k_shot_train_rows"] == list(FewShot.from_train(train, tokenizer, k=2, seed=5, keep_eos=True).train_rows)
    assert all(0 <= i < 8 for i in baseline["k_shot_train_rows"])
    assert set(baseline["descriptions"]) == {"base_model", "k_shot"}

    state = TrainerState(baseline=baseline)
    report = final_report(evaluator, state, "eval_loss", "min")
    assert report.test is None and report.final["generation_samples"] == 6
    # Nothing trained: the fine-tuned model is the base model, so the gain is exactly zero, on validation.
    assert (report.gain["split"], report.gain["baseline_kind"], report.gain["delta"]) == ("validation", "base_model", 0.0)
