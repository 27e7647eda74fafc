"""Batch order (a pure function of seed and epoch) and padding-free packing that keeps attention inside rows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from finetune_trainer.collate import (
    Batching, ClassificationCollator, PackedLMCollator, PaddedLMCollator, epoch_permutation, label_tokens, padding_fraction,
)
from helpers_assets import assets  # noqa: F401


def test_order_is_a_pure_function_of_seed_and_epoch():
    assert epoch_permutation(50, 7, 0) == epoch_permutation(50, 7, 0)
    assert epoch_permutation(50, 7, 0) != epoch_permutation(50, 7, 1)
    assert epoch_permutation(50, 7, 0) != epoch_permutation(50, 8, 0)
    assert sorted(epoch_permutation(50, 7, 3)) == list(range(50))


def test_resume_skips_exactly_the_consumed_batches():
    b = Batching(num_rows=37, batch_size=4, seed=1)
    full = b.epoch_batches(2)
    assert len(full) == b.batches_per_epoch == 10 and len(full[-1]) == 1
    assert b.epoch_batches(2, start_batch=6) == full[6:]
    assert [b.rows(2, i) for i in range(10)] == full


def test_ranks_get_disjoint_equal_shares():
    shards = [Batching(num_rows=40, batch_size=4, world_size=2, rank=r, seed=3).epoch_batches(0) for r in range(2)]
    rows = [sum(s, []) for s in shards]
    assert len(shards[0]) == len(shards[1]) == 5
    assert not set(rows[0]) & set(rows[1]) and sorted(rows[0] + rows[1]) == list(range(40))
    # Uneven: wrap around so every rank still gets full micro-batches (like DistributedSampler).
    uneven = [Batching(num_rows=10, batch_size=4, world_size=2, rank=r).epoch_batches(0) for r in range(2)]
    assert [len(x) for s in uneven for x in s] == [4, 4, 4, 4]


ROWS = [
    {"input_ids": [2, 7, 8, 9, 10, 11], "labels": [-100, -100, 8, 9, 10, 11]},
    {"input_ids": [2, 12, 13], "labels": [-100, 13, 13]},
    {"input_ids": [2, 14, 15, 16, 17], "labels": [2, 14, 15, 16, 17]},
]


def _lm_loss(logits, labels):
    return F.cross_entropy(logits[..., :-1, :].reshape(-1, logits.shape[-1]).float(), labels[..., 1:].reshape(-1),
                           ignore_index=-100, reduction="sum")


def test_packed_batch_equals_padded_batch_on_a_real_llama(assets):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(assets["llama"], attn_implementation="sdpa").eval()
    packed = PackedLMCollator()(ROWS)
    padded = PaddedLMCollator(pad_token_id=0)(ROWS)
    assert packed["input_ids"].shape == (1, 14) and "attention_mask" not in packed
    assert packed["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 0, 1, 2, 0, 1, 2, 3, 4]]
    # No row learns to predict the next row's first token.
    assert packed["labels"][0, 6].item() == -100 and packed["labels"][0, 9].item() == -100
    assert label_tokens(packed) == label_tokens(padded) == 4 + 2 + 4
    assert padding_fraction(packed) == 0.0 and padding_fraction(padded) == pytest.approx(1 - 14 / 18)
    model.config.use_cache = False  # as in training: with a KV cache transformers does not look for packed rows
    with torch.no_grad():
        lp = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits
        ld = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
        # Row 3 alone: its logits inside the pack must not depend on rows 1-2 (attention stays in the row).
        alone = model(input_ids=torch.tensor([ROWS[2]["input_ids"]])).logits
    torch.testing.assert_close(lp[0, 9:], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_lm_loss(lp, packed["labels"]), _lm_loss(ld, padded["labels"]), atol=1e-4, rtol=1e-5)
    # Without position ids the same tokens attend across rows, and row 3's logits change: the check has teeth.
    with torch.no_grad():
        leaky = model(input_ids=packed["input_ids"]).logits
    assert not torch.allclose(leaky[0, 9:], alone[0], atol=1e-3)


def test_classification_collator_pads_and_renames_label():
    batch = ClassificationCollator(pad_token_id=0)([{"input_ids": [101, 5, 102], "label": 1}, {"input_ids": [101, 102], "label": 0}])
    assert batch["input_ids"].tolist() == [[101, 5, 102], [101, 102, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [1, 0]
