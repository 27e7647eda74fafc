"""Encoder-decoder models (``model.task: seq2seq-lm``, e.g. BART, T5): batches and generation.

The prepared rows are the same as a causal LM's prompt-completion rows (:mod:`.data.tokenize`):
``input_ids`` = prompt ids then completion ids + EOS, ``labels`` -100 on the prompt. Here a row is split
at its first scored token: the prompt is the encoder's input, the completion the decoder's labels.
Splitting late keeps one row shape through staging, hygiene (dedupe and leakage compare the prompt and
completion texts as for any prompt-completion data), the data report and the checkpoints.

The decoder's inputs are the labels shifted right behind the model's ``decoder_start_token_id``
(``prepare_decoder_input_ids_from_labels``, what the model itself does when it is given labels); the
logits are then aligned with the labels, so the loss is taken without the causal shift
(:class:`.loss.WindowLoss` and :func:`.evaluate.evaluate_lm` with ``shift=False``), over the same
global token count as a causal LM's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from finetune_trainer.data.tokenize import IGNORE_INDEX
from finetune_trainer.evaluate import EvalMode, device_of

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def split_row(input_ids: Sequence[int], labels: Sequence[int]) -> tuple[list[int], list[int]]:
    """``(source ids, target ids)`` of a stored seq2seq row: the encoder's input and the decoder's labels."""
    ids, labels = list(input_ids), list(labels)
    first = next((i for i, t in enumerate(labels) if t != IGNORE_INDEX), len(labels))
    return ids[:first], labels[first:]


def _pad_right(seqs: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    width = max((len(s) for s in seqs), default=0)
    out = torch.full((len(seqs), max(width, 1)), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            out[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
    return out


class Seq2SeqCollator:
    """Rows -> ``input_ids``/``attention_mask`` (the source, right-padded), ``decoder_input_ids`` and ``labels``
    (the target, padded with -100).

    ``decoder_inputs`` is the model's ``prepare_decoder_input_ids_from_labels`` (labels shifted right behind
    ``decoder_start_token_id``, -100 replaced by the pad token): a function of the config alone.
    """

    def __init__(self, pad_token_id: int, decoder_inputs: Callable[..., torch.Tensor]):
        self.pad_token_id = int(pad_token_id)
        self.decoder_inputs = decoder_inputs

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        pairs = [split_row(r["input_ids"], r["labels"]) for r in rows]
        sources = [s if s else [self.pad_token_id] for s, _ in pairs]  # an encoder needs one position
        input_ids = _pad_right(sources, self.pad_token_id)
        attention_mask = _pad_right([[1] * len(s) for s in sources], 0)
        labels = _pad_right([t for _, t in pairs], IGNORE_INDEX)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "decoder_input_ids": self.decoder_inputs(labels=labels),
            "labels": labels,
        }


def decoder_inputs_of(model: Any) -> Callable[..., torch.Tensor]:
    """The model's own labels -> decoder inputs shift (BART's ``shift_tokens_right``, T5's ``_shift_right``)."""
    prepare = getattr(model, "prepare_decoder_input_ids_from_labels", None)
    if prepare is None:
        from .errors import InvalidConfig

        raise InvalidConfig(
            f"model type {model.config.model_type} is not an encoder-decoder with a decoder start token; "
            "model.task seq2seq-lm needs one such as BART or T5"
        )
    return prepare


@torch.no_grad()
def generate_from_sources(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, sources: Sequence[Sequence[int]], *,
    max_new_tokens: int = 64, batch_size: int = 8, num_beams: int = 1,
) -> list[str]:
    """The decoder's output for each source (token ids, as in training), special tokens skipped, stripped.

    Sources are right-padded and masked (the encoder reads every position at once; right padding keeps BART's
    learned positions where training had them); ``generate`` starts every row from ``decoder_start_token_id``.
    """
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError("max_new_tokens and batch_size must be at least 1")
    if any(len(s) == 0 for s in sources):
        raise ValueError("every source needs at least one token")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad token nor an eos token to pad sources with")
    device = device_of(model, None)
    outputs: list[str] = []
    with EvalMode(model):
        for start in range(0, len(sources), batch_size):
            batch = sources[start : start + batch_size]
            generated = model.generate(
                input_ids=_pad_right(batch, pad).to(device),
                attention_mask=_pad_right([[1] * len(s) for s in batch], 0).to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=num_beams,
                pad_token_id=pad,
            )
            outputs.extend(t.strip() for t in tokenizer.batch_decode(generated, skip_special_tokens=True))
    return outputs
