"""Evaluation module: every metric checked against a number computed independently (by hand, by sklearn, or by
running the model one row at a time), on tiny randomly initialised models so the suite runs on a laptop CPU."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

from finetune_api.spec import EarlyStopping as EarlyStoppingSpec
from finetune_api.spec import RetentionSpec
from finetune_trainer.errors import EmptyDataset, InvalidConfig, RetentionExceeded
from finetune_trainer.calibration import calibrate, expected_calibration_error, fit_temperature
from finetune_trainer.early_stopping import EarlyStopping
from finetune_trainer.evaluate import (
    evaluate_classification,
    evaluate_lm,
    gain,
    majority_baseline,
    perplexity,
    retention_check,
)
from finetune_trainer.generation import generate_and_score, score_texts

VOCAB = 48
EOS, PAD = 2, 0


# ------------------------------------------------------------------------------------------ fixtures


def _transformers():
    return pytest.importorskip("transformers")  # imported lazily: the two-rank worker below does without it


@pytest.fixture(scope="module")
def tiny_lm():
    transformers = _transformers()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=EOS,
        pad_token_id=PAD,
        attn_implementation="sdpa",
    )
    return transformers.LlamaForCausalLM(config).eval()


def _lm_rows(seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """Rows of different lengths; some have a prompt whose labels are -100 (loss on the completion only)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for length, prompt_len in [(9, 0), (5, 2), (12, 6), (3, 0), (7, 3), (10, 0)]:
        ids = torch.randint(3, VOCAB, (length,), generator=g)
        labels = ids.clone()
        labels[:prompt_len] = -100
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def _pad(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    width = max(len(r["input_ids"]) for r in rows)
    batch = {"input_ids": [], "labels": [], "attention_mask": []}
    for r in rows:
        pad = width - len(r["input_ids"])
        batch["input_ids"].append(F.pad(r["input_ids"], (0, pad), value=PAD))
        batch["labels"].append(F.pad(r["labels"], (0, pad), value=-100))
        batch["attention_mask"].append(F.pad(torch.ones_like(r["input_ids"]), (0, pad), value=0))
    return {k: torch.stack(v) for k, v in batch.items()}


def _uneven_batches(rows):
    """Batches of 3, 2 and 1 rows: a mean of per-batch means would weight these wrongly."""
    return [_pad(rows[0:3]), _pad(rows[3:5]), _pad(rows[5:6])]


def _by_hand(model, rows) -> tuple[float, float, int]:
    """Loss and accuracy computed one unpadded row at a time, summed over all tokens of the set."""
    nll, correct, tokens = 0.0, 0, 0
    with torch.no_grad():
        for r in rows:
            logits = model(input_ids=r["input_ids"][None]).logits[0, :-1]
            target = r["labels"][1:]
            keep = target != -100
            nll += F.cross_entropy(logits[keep], target[keep], reduction="sum").item()
            correct += int((logits[keep].argmax(-1) == target[keep]).sum())
            tokens += int(keep.sum())
    return nll / tokens, correct / tokens, tokens


# ------------------------------------------------------------------------------------------- causal LM


def test_evaluate_lm_is_token_weighted_over_uneven_batches(tiny_lm):
    rows = _lm_rows()
    batches = _uneven_batches(rows)
    loss, accuracy, tokens = _by_hand(tiny_lm, rows)

    result = evaluate_lm(tiny_lm, batches)

    assert result["eval_tokens"] == tokens == 8 + 3 + 6 + 2 + 4 + 9  # length - max(prompt, 1) per row
    assert result["eval_loss"] == pytest.approx(loss, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert result["token_accuracy"] == pytest.approx(accuracy)
    # The test can tell: the mean of the per-batch model losses is a different number.
    with torch.no_grad():
        batch_means = [tiny_lm(**b).loss.item() for b in batches]
    assert abs(np.mean(batch_means) - loss) > 1e-3


def test_evaluate_lm_is_the_models_own_loss_on_one_batch(tiny_lm):
    batch = _pad(_lm_rows(seed=2))
    with torch.no_grad():
        model_loss = tiny_lm(**batch).loss.item()
    assert evaluate_lm(tiny_lm, [batch])["eval_loss"] == pytest.approx(model_loss, rel=1e-5)


def test_evaluate_lm_packed_rows_score_each_sequence_separately(tiny_lm):
    """Padding-free packing: two rows in one sequence, position_ids restart, first label of the second is -100."""
    a, b = _lm_rows(seed=3)[0], _lm_rows(seed=3)[2]
    b_labels = b["labels"].clone()
    b_labels[0] = -100
    packed = {
        "input_ids": torch.cat([a["input_ids"], b["input_ids"]])[None],
        "labels": torch.cat([a["labels"], b_labels])[None],
        "position_ids": torch.cat([torch.arange(len(a["input_ids"])), torch.arange(len(b["input_ids"]))])[None],
    }
    loss, _, tokens = _by_hand(tiny_lm, [a, b])
    result = evaluate_lm(tiny_lm, [packed])
    assert result["eval_tokens"] == tokens
    assert result["eval_loss"] == pytest.approx(loss, rel=1e-5)


def test_evaluate_lm_max_batches_and_training_mode_restored(tiny_lm):
    rows = _lm_rows()
    tiny_lm.train()
    try:
        result = evaluate_lm(tiny_lm, _uneven_batches(rows), max_batches=1)
        assert tiny_lm.training
    finally:
        tiny_lm.eval()
    loss, _, tokens = _by_hand(tiny_lm, rows[:3])
    assert result["eval_tokens"] == tokens
    assert result["eval_loss"] == pytest.approx(loss, rel=1e-5)


def test_evaluate_lm_with_accelerator_prepared_dataloader(tiny_lm):
    accelerate = pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState, GradientState

    rows = _lm_rows()
    accelerator = accelerate.Accelerator(cpu=True)
    try:
        loader = accelerator.prepare_data_loader(
            torch.utils.data.DataLoader(rows, batch_size=4, collate_fn=_pad, shuffle=False)
        )
        result = evaluate_lm(tiny_lm, loader, accelerator=accelerator)
        loss, _, tokens = _by_hand(tiny_lm, rows)
        assert result["eval_tokens"] == tokens
        assert result["eval_loss"] == pytest.approx(loss, rel=1e-5)
        # Stopping early must not leave the eval loader registered as accelerate's active dataloader.
        evaluate_lm(tiny_lm, loader, accelerator=accelerator, max_batches=1)
        assert not accelerator.gradient_state.in_dataloader
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def test_evaluate_lm_without_scored_tokens_is_an_empty_dataset(tiny_lm):
    batch = _pad(_lm_rows())
    batch["labels"][:] = -100
    with pytest.raises(EmptyDataset):
        evaluate_lm(tiny_lm, [batch])


def test_perplexity_does_not_overflow():
    assert perplexity(2.0) == pytest.approx(math.exp(2.0))
    assert perplexity(1e4) == math.inf


# -------------------------------------------------------------------------------------- classification


class TinyCausalLM(torch.nn.Module):
    """A causal LM without transformers: the logits at t depend on the mean embedding of tokens 0..t."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.embed = torch.nn.Embedding(VOCAB, 16)
        self.head = torch.nn.Linear(16, VOCAB)

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids).cumsum(1) / torch.arange(1, input_ids.shape[1] + 1)[None, :, None]
        return SimpleNamespace(logits=self.head(h))


class BagOfWords(torch.nn.Module):
    """A fixed classifier: mean of the unmasked token embeddings, then a linear layer."""

    def __init__(self, num_labels: int):
        super().__init__()
        torch.manual_seed(5)
        self.embed = torch.nn.Embedding(VOCAB, 8)
        self.head = torch.nn.Linear(8, num_labels)

    def forward(self, input_ids, attention_mask):
        mask = attention_mask.unsqueeze(-1).float()
        pooled = (self.embed(input_ids) * mask).sum(1) / mask.sum(1)
        return SimpleNamespace(logits=self.head(pooled) * 3.0)


def _classification_batches(n: int = 37, num_labels: int = 4, seed: int = 7):
    g = torch.Generator().manual_seed(seed)
    batches = []
    for start in range(0, n, 8):  # 8, 8, 8, 8, 5
        size = min(8, n - start)
        ids = torch.randint(3, VOCAB, (size, 6), generator=g)
        mask = torch.ones_like(ids)
        mask[:, 4:] = torch.randint(0, 2, (size, 2), generator=g)
        labels = torch.randint(0, num_labels - 1, (size,), generator=g)  # class 3 never occurs
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches


def test_evaluate_classification_matches_sklearn():
    model = BagOfWords(4)
    batches = _classification_batches()
    with torch.no_grad():
        logits = torch.cat([model(b["input_ids"], b["attention_mask"]).logits for b in batches])
    y_true = torch.cat([b["labels"] for b in batches]).numpy()
    y_pred = logits.argmax(1).numpy()
    names = ["neg", "neu", "pos", "other"]

    result = evaluate_classification(model, batches, num_labels=4, label_names=names)

    p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, average="macro", zero_division=0)
    assert result["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert result["precision_macro"] == pytest.approx(p)
    assert result["recall_macro"] == pytest.approx(r)
    assert result["f1_macro"] == pytest.approx(f)
    assert result["eval_loss"] == pytest.approx(F.cross_entropy(logits, torch.from_numpy(y_true)).item(), rel=1e-5)
    assert result["ece"] == pytest.approx(expected_calibration_error(logits.softmax(1), torch.from_numpy(y_true)))
    assert result["eval_samples"] == 37
    assert list(result["per_class"]) == names
    per_f1 = f1_score(y_true, y_pred, labels=[0, 1, 2, 3], average=None, zero_division=0)
    for i, name in enumerate(names):
        assert result["per_class"][name]["support"] == int((y_true == i).sum())
        assert result["per_class"][name]["f1"] == pytest.approx(per_f1[i])
    assert result["per_class"]["other"]["support"] == 0
    assert "logits" not in result


def test_evaluate_classification_temperature_changes_loss_and_ece_not_accuracy():
    model = BagOfWords(4)
    batches = _classification_batches()
    plain = evaluate_classification(model, batches, num_labels=4, return_logits=True)
    hot = evaluate_classification(model, batches, num_labels=4, temperature=2.0)
    assert hot["accuracy"] == plain["accuracy"] and hot["f1_macro"] == plain["f1_macro"]
    expected_loss = F.cross_entropy(plain["logits"] / 2.0, plain["labels"]).item()
    assert hot["eval_loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert hot["ece"] != pytest.approx(plain["ece"])
    assert plain["logits"].shape == (37, 4) and plain["labels"].shape == (37,)


def test_evaluate_classification_on_a_transformers_model():
    transformers = _transformers()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, num_labels=3, pad_token_id=PAD,
    )
    model = transformers.LlamaForSequenceClassification(config).eval()
    batches = _classification_batches(n=12, num_labels=3)
    with torch.no_grad():
        y_pred = torch.cat([model(**{k: v for k, v in b.items() if k != "labels"}).logits.argmax(1) for b in batches])
    y_true = torch.cat([b["labels"] for b in batches])
    result = evaluate_classification(model, batches, num_labels=3)
    assert result["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert set(result["per_class"]) == {"0", "1", "2"}


def test_evaluate_classification_rejects_out_of_range_labels():
    batches = _classification_batches(n=8)
    batches[0]["labels"][0] = 9
    with pytest.raises(ValueError, match="class ids"):
        evaluate_classification(BagOfWords(4), batches, num_labels=4)


def test_majority_baseline():
    result = majority_baseline([0, 1, 1, 2, 1], [1, 0, 1, 2], num_labels=3)
    assert result["majority_class"] == 1
    assert result["accuracy"] == pytest.approx(0.5)
    # F1 per present class: class 1 -> P=2/4, R=1 -> 2/3; classes 0 and 2 -> 0.
    assert result["f1_macro"] == pytest.approx((2 / 3) / 3)
    assert majority_baseline([2, 0], [0], num_labels=3)["majority_class"] == 0  # ties: lowest id


# ----------------------------------------------------------------------------------------- calibration


def test_ece_equals_hand_computed_value():
    # n_bins=10. Bin (0.9, 1.0]: conf .95 right, .95 wrong -> |0.5 - 0.95| = 0.45, weight 2/5.
    # Bin (0.6, 0.7]: .65 right, .62 right, .61 wrong -> |2/3 - 0.62667| = 0.04, weight 3/5.
    probs = torch.tensor([[0.95, 0.05], [0.05, 0.95], [0.65, 0.35], [0.38, 0.62], [0.61, 0.39]])
    labels = torch.tensor([0, 0, 0, 1, 1])
    assert expected_calibration_error(probs, labels, n_bins=10) == pytest.approx(0.4 * 0.45 + 0.6 * 0.04)


def test_ece_bins_are_closed_on_the_right():
    # n_bins=2: 0.5 belongs to (0, 0.5] -> bins {0.5 right} and {0.75 wrong}: (0.5 + 0.75) / 2.
    probs = torch.tensor([[0.5, 0.5], [0.25, 0.75]])
    assert expected_calibration_error(probs, torch.tensor([0, 0]), n_bins=2) == pytest.approx(0.625)


def test_ece_is_zero_when_calibrated():
    probs = torch.tensor([[0.75, 0.25]] * 4 + [[0.2, 0.8]] * 5, dtype=torch.float64)
    labels = torch.tensor([0, 0, 0, 1] + [1, 1, 1, 1, 0])
    assert expected_calibration_error(probs, labels) == pytest.approx(0.0, abs=1e-12)


def _overconfident(true_temperature: float, n: int = 20000, k: int = 5, seed: int = 0):
    """Labels drawn from softmax(z); the 'model' reports z * T, i.e. is T times too sharp."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, k, generator=g, dtype=torch.float64) * 2.0
    labels = torch.multinomial(z.softmax(1), 1, generator=g).squeeze(1)
    return z * true_temperature, labels


def test_fit_temperature_recovers_a_known_temperature():
    logits, labels = _overconfident(2.5)
    assert fit_temperature(logits, labels) == pytest.approx(2.5, rel=0.05)
    logits, labels = _overconfident(0.5, seed=1)  # under-confident
    assert fit_temperature(logits, labels) == pytest.approx(0.5, rel=0.05)


def test_calibrate_lowers_ece_and_nll_of_overconfident_logits():
    logits, labels = _overconfident(3.0, n=5000)
    result = calibrate(logits.float(), labels)
    assert set(result) == {"temperature", "ece_before", "ece_after", "nll_before", "nll_after"}
    assert result["temperature"] > 2.0
    assert result["ece_before"] > 0.1
    assert result["ece_after"] < 0.03
    assert result["nll_after"] < result["nll_before"] - 0.1


def test_fit_temperature_is_bounded_on_separable_data():
    logits = torch.tensor([[4.0, 0.0], [0.0, 4.0]] * 10)
    labels = torch.tensor([0, 1] * 10)
    result = calibrate(logits, labels)
    assert 0.01 <= result["temperature"] < 1.0
    assert result["nll_after"] <= result["nll_before"]


# ------------------------------------------------------------------------------------- early stopping


def test_early_stopping_stops_after_exactly_patience_bad_evals():
    es = EarlyStopping("eval_loss", "min", patience=3, min_delta=0.0)
    assert es.update(1.0, 100) and es.best == 1.0 and es.best_step == 100
    assert not es.update(1.0, 200)  # equal is not better
    assert not es.update(1.2, 300)
    assert not es.should_stop and es.bad_evals == 2
    assert not es.update(1.1, 400)
    assert es.should_stop and es.bad_evals == 3
    assert es.best == 1.0 and es.best_step == 100


def test_early_stopping_improvement_resets_the_count():
    es = EarlyStopping("eval_loss", "min", patience=2, min_delta=0.0)
    es.update(1.0, 1)
    es.update(1.1, 2)
    assert es.update(0.9, 3) and es.bad_evals == 0
    es.update(0.95, 4)
    assert not es.should_stop


def test_early_stopping_respects_min_delta():
    es = EarlyStopping("eval_loss", "min", patience=2, min_delta=0.05)
    es.update(1.0, 1)
    assert not es.update(0.96, 2)  # better, but by less than min_delta
    assert es.best == 1.0
    assert es.update(0.94, 3) and es.best == 0.94


def test_early_stopping_mode_max():
    es = EarlyStopping("f1_macro", "max", patience=1, min_delta=0.01)
    assert es.update(0.50, 1)
    assert es.update(0.52, 2)
    assert not es.update(0.525, 3)
    assert es.should_stop and es.best == 0.52 and es.best_step == 2


def test_early_stopping_nan_is_never_an_improvement():
    es = EarlyStopping("eval_loss", "min", patience=1, min_delta=0.0)
    assert not es.update(float("nan"), 1)
    assert es.best is None and es.should_stop


def test_early_stopping_state_dict_round_trip_resumes_identically():
    values = [1.0, 0.8, 0.85, 0.79, 0.9, 0.95, 0.7]
    straight = EarlyStopping("eval_loss", "min", patience=3, min_delta=0.02)
    decisions = [straight.update(v, i) for i, v in enumerate(values)]

    first = EarlyStopping("eval_loss", "min", patience=3, min_delta=0.02)
    resumed_decisions = [first.update(v, i) for i, v in enumerate(values[:4])]
    import json

    state = json.loads(json.dumps(first.state_dict()))  # it goes into a JSON manifest
    second = EarlyStopping("eval_loss", "min", patience=3, min_delta=0.02)
    second.load_state_dict(state)
    assert (second.best, second.best_step, second.bad_evals) == (first.best, first.best_step, first.bad_evals)
    resumed_decisions += [second.update(v, i) for i, v in enumerate(values[4:], start=4)]
    assert resumed_decisions == decisions
    assert second.state_dict() == straight.state_dict()


def test_early_stopping_refuses_state_for_another_metric():
    state = EarlyStopping("eval_loss", "min", 3, 0.0).state_dict()
    with pytest.raises(ValueError, match="monitors"):
        EarlyStopping("accuracy", "max", 3, 0.0).load_state_dict(state)


def test_early_stopping_from_spec_and_missing_metric():
    es = EarlyStopping.from_spec(EarlyStoppingSpec(metric="accuracy", mode="max", patience=4, min_delta=0.1))
    assert (es.metric, es.mode, es.patience, es.min_delta) == ("accuracy", "max", 4, 0.1)
    assert es.update_from({"accuracy": 0.7, "eval_loss": 1.0}, 10) and es.best == 0.7
    with pytest.raises(InvalidConfig, match="accuracy"):
        es.update_from({"eval_loss": 1.0}, 20)



@pytest.mark.parametrize("metric", ["f1_macro", "accuracy"])
def test_early_stopping_on_a_score_keeps_the_higher_value_when_mode_is_left_unset(metric):
    """The spec's own example (earlyStopping.metric f1_macro, no mode) used to minimise F1: it kept 0.40 as the
    best, stopped while F1 was rising, and useBestModel exported the worst checkpoint."""
    es = EarlyStopping.from_spec(EarlyStoppingSpec(metric=metric, patience=2))
    assert es.mode == "max"
    assert es.update(0.40, 1) and es.update(0.55, 2) and es.update(0.70, 3)
    assert not es.update(0.65, 4) and not es.should_stop
    assert es.best == 0.70 and es.best_step == 3


def test_improves_follows_the_direction():
    from finetune_trainer.early_stopping import improves

    assert improves(0.7, 0.5, "max") and not improves(0.7, 0.5, "min")
    assert improves(0.3, 0.5, "min") and not improves(0.5, 0.5, "min")
    assert improves(1.0, None, "max") and not improves(float("nan"), None, "min")
    assert not improves(0.52, 0.5, "max", min_delta=0.05)


# ----------------------------------------------------------------------------------- generation metrics


def test_bleu_and_rouge_of_identical_and_disjoint_texts():
    refs = ["the quick brown fox jumps over the lazy dog", "a stitch in time saves nine"]
    same = score_texts(refs, refs)
    assert same["bleu"] == pytest.approx(100.0)
    assert same["rouge_l"] == pytest.approx(1.0)
    disjoint = score_texts(["zebra yacht xylophone wombat vulture umbrella", "kiwi lemon mango"], refs)
    assert disjoint["bleu"] == pytest.approx(0.0, abs=1e-6)
    assert disjoint["rouge_l"] == 0.0
    assert same["generation_samples"] == 2


def test_rouge_l_hand_computed_and_non_ascii():
    # LCS("the cat on mat", "the cat sat on the mat") = 4: P = 4/4, R = 4/6, F = 0.8.
    assert score_texts(["the cat on mat"], ["the cat sat on the mat"], metrics=["rouge"])["rouge_l"] == pytest.approx(0.8)
    assert score_texts(["über die Straße"], ["Über die Straße"], metrics=["rouge"])["rouge_l"] == pytest.approx(1.0)


def test_score_texts_rejects_unknown_metrics_and_mismatched_lengths():
    with pytest.raises(ValueError, match="unknown"):
        score_texts(["a"], ["a"], metrics=["meteor"])
    with pytest.raises(ValueError):
        score_texts(["a", "b"], ["a"])


def _word_tokenizer(with_pad: bool):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[PAD]", "[BOS]", "[EOS]"] + [f"w{i}" for i in range(VOCAB - 3)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[PAD]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    kwargs = {"pad_token": "[PAD]"} if with_pad else {}
    return _transformers().PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="[EOS]", **kwargs)


def _greedy_by_hand(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    new: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            nxt = int(model(input_ids=ids).logits[0, -1].argmax())
            if nxt == EOS:
                break
            new.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return tokenizer.decode(new, skip_special_tokens=True).strip()


@pytest.mark.parametrize("with_pad", [True, False])
def test_generate_and_score_uses_greedy_left_padded_generation(tiny_lm, with_pad):
    tokenizer = _word_tokenizer(with_pad)
    tokenizer.padding_side = "right"
    prompts = ["w1 w2 w3 w4 w5", "w9", "w20 w21 w22"]
    hypotheses = [_greedy_by_hand(tiny_lm, tokenizer, p, 6) for p in prompts]
    references = [hypotheses[0], "w40 w41", hypotheses[2]]

    prompt_ids = [tokenizer(p)["input_ids"] for p in prompts]
    result = generate_and_score(tiny_lm, tokenizer, prompt_ids, references, max_new_tokens=6, batch_size=2)

    assert result == pytest.approx(score_texts(hypotheses, references))
    assert tokenizer.padding_side == "right"  # the tokenizer is left alone: padding is done on the ids
    assert (tokenizer.pad_token is None) == (not with_pad)


# ---------------------------------------------------------------------------------- retention and gain


def test_retention_check_passes_within_threshold():
    result = retention_check(2.0, 2.1, RetentionSpec(dataset="/data/general.jsonl", max_loss_increase=0.1, action="fail"))
    assert result["relative_increase"] == pytest.approx(0.05)
    assert result["threshold"] == 0.1 and result["passed"] is True
    assert (result["loss_before"], result["loss_after"]) == (2.0, 2.1)


def test_retention_check_warns_past_threshold():
    result = retention_check(2.0, 2.5, RetentionSpec(dataset="/data/general.jsonl", max_loss_increase=0.1))
    assert result["relative_increase"] == pytest.approx(0.25)
    assert result["passed"] is False and result["action"] == "warn"


def test_retention_check_fails_past_threshold():
    spec = RetentionSpec(dataset="/data/general.jsonl", max_loss_increase=0.1, action="fail")
    with pytest.raises(RetentionExceeded) as info:
        retention_check(2.0, 2.5, spec)
    assert info.value.exit_code == 22
    assert "2.0000" in info.value.line() and "2.5000" in info.value.line() and "+25.0%" in info.value.line()
    with pytest.raises(RetentionExceeded):
        retention_check(2.0, float("nan"), spec)  # a diverged model does not pass


def test_gain_min_and_max():
    loss = gain({"eval_loss": 2.0}, {"eval_loss": 1.5}, "eval_loss", "min")
    assert loss == {"metric": "eval_loss", "baseline": 2.0, "final": 1.5, "delta": -0.5, "relative": -0.25, "improved": True}
    acc = gain({"accuracy": 0.8}, {"accuracy": 0.7}, "accuracy", "max")
    assert acc["delta"] == pytest.approx(-0.1) and acc["relative"] == pytest.approx(-0.125) and acc["improved"] is False
    assert gain({"accuracy": 0.0}, {"accuracy": 0.5}, "accuracy", "max")["relative"] is None
    with pytest.raises(ValueError, match="missing"):
        gain({}, {"accuracy": 0.5}, "accuracy", "max")


# ------------------------------------------------------------------------------------- two ranks (gloo)

_WORKER = r'''
import json, sys
import torch
from accelerate import Accelerator
sys.path.insert(0, sys.argv[1])
import test_evaluate as t
from finetune_trainer.evaluate import evaluate_classification, evaluate_lm

accelerator = Accelerator(cpu=True)
model = t.TinyCausalLM()
rows = t._lm_rows()[:5]  # 5 rows, batch 2, 2 ranks: accelerate repeats a row to even out the last batch
loader = accelerator.prepare_data_loader(torch.utils.data.DataLoader(rows, batch_size=2, collate_fn=t._pad))
lm = evaluate_lm(model, loader, accelerator=accelerator)
examples = [dict(zip(b, v)) for b in t._classification_batches(n=7) for v in zip(*b.values())]
collate = lambda xs: {k: torch.stack([x[k] for x in xs]) for k in xs[0]}
loader = accelerator.prepare_data_loader(torch.utils.data.DataLoader(examples, batch_size=2, collate_fn=collate))
clf = evaluate_classification(t.BagOfWords(4), loader, num_labels=4, accelerator=accelerator)
result = {"lm": lm, "clf": {k: v for k, v in clf.items() if k != "per_class"}}
with open(f"{sys.argv[2]}/rank{accelerator.process_index}.json", "w") as f:  # not stdout: ranks interleave there
    json.dump(result, f)
'''


@pytest.mark.slow
def test_metrics_are_exact_across_two_ranks(tmp_path):
    """Two gloo ranks: the rows accelerate repeats to even out the last batch must not be counted twice."""
    import json
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    worker = tmp_path / "worker.py"
    worker.write_text(_WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(port), str(worker), str(Path(__file__).parent), str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    results = {rank: json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in ("0", "1")}
    assert results["0"] == results["1"]

    loss, accuracy, tokens = _by_hand(TinyCausalLM(), _lm_rows()[:5])
    lm = results["0"]["lm"]
    assert lm["eval_tokens"] == tokens
    assert lm["eval_loss"] == pytest.approx(loss, rel=1e-5)
    assert lm["token_accuracy"] == pytest.approx(accuracy)

    single = evaluate_classification(BagOfWords(4), _classification_batches(n=7), num_labels=4)
    clf = results["0"]["clf"]
    assert clf["eval_samples"] == 7
    for key in ("accuracy", "f1_macro", "eval_loss", "ece"):
        assert clf[key] == pytest.approx(single[key], rel=1e-5), key
