"""Packed rows without flash-attn: per-document SDPA, no square mask, and the start-up check (issue 10 §8)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from finetune_trainer.attention import PER_DOCUMENT_SDPA, check_packing, document_lengths, use_per_document_sdpa
from finetune_trainer.collate import PackedLMCollator, PaddedLMCollator
from finetune_trainer.errors import InvalidConfig

ROWS = [[2, 7, 8, 9, 10, 11, 12, 13], [2, 14, 15], [2, 16, 17, 18, 19, 20]]


def _llama(**overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = dict(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=4096, attention_dropout=0.0)
    return LlamaForCausalLM(LlamaConfig(**{**config, **overrides}))


def _mistral(sliding_window: int):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    return MistralForCausalLM(MistralConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                            num_key_value_heads=2, max_position_embeddings=256, sliding_window=sliding_window))


def _lm_loss(logits, labels):
    return F.cross_entropy(logits[..., :-1, :].reshape(-1, logits.shape[-1]), labels[..., 1:].reshape(-1), ignore_index=-100, reduction="sum")


def test_document_lengths_follow_the_position_id_restarts():
    assert document_lengths(torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])) == [3, 2, 4]
    assert document_lengths(torch.arange(5)) == [5]
    assert document_lengths(torch.tensor([3, 4, 0, 1])) == [2, 2]  # a row cut mid-way still starts a document


@pytest.mark.parametrize("make", [_llama, lambda: _mistral(sliding_window=4)], ids=["llama", "mistral-sliding-window-4"])
def test_packed_logits_and_gradients_equal_the_padded_batch(make):
    """Per-document SDPA on a packed row = transformers' stock SDPA on the padded batch (sliding windows too)."""
    packed_model, padded_model = make(), make()
    assert use_per_document_sdpa(packed_model) and packed_model.config._attn_implementation == PER_DOCUMENT_SDPA
    assert padded_model.config._attn_implementation == "sdpa"
    rows = [{"input_ids": r, "labels": [-100, *r[1:]]} for r in ROWS]
    packed, padded = PackedLMCollator()(rows), PaddedLMCollator(pad_token_id=0)(rows)
    lp = packed_model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits
    ld = padded_model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"], use_cache=False).logits
    start = 0
    for i, r in enumerate(ROWS):
        torch.testing.assert_close(lp[0, start : start + len(r)], ld[i, : len(r)], atol=1e-5, rtol=1e-5)
        start += len(r)
    _lm_loss(lp, packed["labels"]).backward()
    _lm_loss(ld, padded["labels"]).backward()
    grads = dict(padded_model.named_parameters())
    for name, p in packed_model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, atol=1e-5, rtol=1e-4, msg=name)
    # Padded batches (evaluation) on the per-document model still take transformers' masked path.
    with torch.no_grad():
        again = packed_model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"], use_cache=False).logits
    torch.testing.assert_close(again, ld.detach(), atol=1e-5, rtol=1e-5)


def _attention_masks_seen(model, **inputs) -> list:
    seen = []
    hooks = [m.register_forward_pre_hook(lambda _m, _a, kw: seen.append(kw.get("attention_mask")), with_kwargs=True)
             for name, m in model.named_modules() if name.endswith("self_attn")]
    with torch.no_grad():
        model(**inputs, use_cache=False)
    for h in hooks:
        h.remove()
    return seen


def _largest_allocation(model, **inputs) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model(**inputs, use_cache=False).logits.sum().backward()
    return max(e.cpu_memory_usage for e in prof.events())


def _packed(docs: int, length: int = 128) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(3, 32, (1, docs * length)), "position_ids": torch.arange(length).repeat(docs)[None]}


def test_a_packed_row_gets_no_square_mask_and_memory_linear_in_tokens():
    stock, per_document = _llama(), _llama()
    use_per_document_sdpa(per_document)
    inputs = _packed(docs=16)
    tokens = inputs["input_ids"].shape[1]

    # The attention layers get no mask at all; transformers' sdpa builds a (1, 1, tokens, tokens) one.
    assert _attention_masks_seen(per_document, **inputs) == [None, None]
    assert [tuple(m.shape) for m in _attention_masks_seen(stock, **inputs)] == [(1, 1, tokens, tokens)] * 2

    # The largest single allocation of forward + backward, at 8 and 16 documents of 128 tokens: twice the
    # tokens give twice the memory (activations, one document's attention), not four times (a token-pair mask).
    small, large = _largest_allocation(per_document, **_packed(docs=8)), _largest_allocation(per_document, **inputs)
    assert large <= 2.2 * small and large < tokens * tokens  # below even a boolean square mask
    small, large = _largest_allocation(stock, **_packed(docs=8)), _largest_allocation(stock, **inputs)
    assert large >= 3.5 * small and large >= tokens * tokens


def _leaky(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """An attention kernel that ignores document boundaries: causal over the whole packed row."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    kwargs.pop("position_ids", None)
    return sdpa_attention_forward(module, query, key, value, None, dropout=dropout, scaling=scaling, **kwargs)


def test_the_start_up_check_passes_a_sound_model_and_fails_one_that_attends_across_rows():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    sound = _llama()
    use_per_document_sdpa(sound)
    assert check_packing(sound, ROWS) < 1e-5
    stock = _llama()  # transformers' sdpa with its block-diagonal mask is correct too, only quadratic
    assert check_packing(stock, ROWS) < 1e-5

    AttentionInterface.register("sdpa_ignores_documents", _leaky)
    AttentionMaskInterface.register("sdpa_ignores_documents", lambda *a, **kw: None)
    leaky = _llama()
    leaky.set_attn_implementation("sdpa_ignores_documents")
    with pytest.raises(InvalidConfig, match=r"hyperparameters.packing: LlamaForCausalLM \(attention sdpa_ignores_documents\) "
                                            r"attends across packed rows.*Set packing: false"):
        check_packing(leaky, ROWS)
    # Too few usable rows (a one-token row): the check makes up its own instead of skipping.
    with pytest.raises(InvalidConfig, match="attends across packed rows"):
        check_packing(leaky, [[5]])
