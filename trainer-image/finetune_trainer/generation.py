"""Generation metrics: greedy completions of evaluation prompts, scored with sacrebleu (BLEU) and
rouge-score (ROUGE-L).

:func:`prompts_and_references` recovers prompts and references from tokenised rows,
:func:`generate_greedy` completes a batch of prompts (left-padded), :func:`score_texts` scores
hypotheses against references and :func:`generate_and_score` does all three.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from finetune_api import metric_catalogue
from finetune_trainer.collate import IGNORE_INDEX
from finetune_trainer.errors import EmptyDataset
from finetune_trainer.evaluate import EvalMode, device_of

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

GENERATION_METRICS = tuple(metric_catalogue.GENERATION_METRICS)  # the evaluation.metrics entries: bleu, rouge

__all__ = ["GENERATION_METRICS", "generate_and_score", "generate_greedy", "prompts_and_references", "score_texts"]


class _WordTokenizer:
    """Lower-cased Unicode word tokens for ROUGE.

    rouge-score's default tokenizer keeps only ``[a-z0-9]`` and so scores any non-English text as empty; this one
    keeps every Unicode letter and digit. No stemming: it is English-only.
    """

    _word = re.compile(r"\w+", re.UNICODE)

    def tokenize(self, text: str) -> list[str]:
        return self._word.findall(text.lower())


def score_texts(
    hypotheses: Sequence[str], references: Sequence[str], *, metrics: Sequence[str] = GENERATION_METRICS
) -> dict[str, float]:
    """Corpus BLEU (sacrebleu, 0-100, default 13a tokenisation) and mean ROUGE-L F1 (rouge-score, 0-1)."""
    _check_metrics(metrics)
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    if not references:
        raise EmptyDataset("no references to score generations against")
    scores: dict[str, float] = {"generation_samples": float(len(references))}
    if "bleu" in metrics:
        import sacrebleu

        scores["bleu"] = float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score)
    if "rouge" in metrics:
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_WordTokenizer())
        f1s = [scorer.score(ref, hyp)["rougeL"].fmeasure for hyp, ref in zip(hypotheses, references)]
        scores["rouge_l"] = float(sum(f1s) / len(f1s))
    return scores


def _check_metrics(metrics: Sequence[str]) -> None:
    unknown = sorted(set(metrics) - set(GENERATION_METRICS))
    if unknown:
        raise ValueError(f"unknown generation metrics {unknown}; known: {list(GENERATION_METRICS)}")


def prompts_and_references(rows: Iterable[Mapping[str, Any]], tokenizer: PreTrainedTokenizerBase) -> tuple[list[str], list[str]]:
    """Prompts and reference completions recovered from tokenised rows (``input_ids``, ``labels``).

    The prompt is everything before the first scored token, the reference the first scored span (a completion
    or an assistant turn). Rows with no prompt (plain text) or nothing scored are skipped.
    """
    prompts, references = [], []
    for row in rows:
        ids, labels = list(row["input_ids"]), list(row["labels"])
        first = next((i for i, t in enumerate(labels) if t != IGNORE_INDEX), None)
        if not first:  # no prompt (plain text rows) or nothing scored
            continue
        end = next((i for i in range(first, len(labels)) if labels[i] == IGNORE_INDEX), len(labels))
        prompts.append(tokenizer.decode(ids[:first], skip_special_tokens=True))
        references.append(tokenizer.decode(ids[first:end], skip_special_tokens=True).strip())
    return prompts, references


@torch.no_grad()
def generate_and_score(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    references: list[str],
    *,
    metrics: Sequence[str] = GENERATION_METRICS,
    max_new_tokens: int = 64,
    batch_size: int = 8,
) -> dict[str, float]:
    """Greedy-decode a completion for each prompt and score it against its reference with :func:`score_texts`.

    Prompts must be formatted as in training (chat template applied for chat data). They are left-padded in
    batches (decoder-only models continue from the last position); the tokenizer's padding side and pad token are
    restored afterwards. Only the newly generated tokens are decoded. Run it on one process with the unwrapped
    model.
    """
    _check_metrics(metrics)
    if len(prompts) != len(references):
        raise ValueError(f"{len(prompts)} prompts for {len(references)} references")
    hypotheses = generate_greedy(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return score_texts(hypotheses, references, metrics=metrics)


@torch.no_grad()
def generate_greedy(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], *, max_new_tokens: int = 64, batch_size: int = 8
) -> list[str]:
    """Greedy completions (new text only, special tokens skipped, stripped)."""
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError("max_new_tokens and batch_size must be at least 1")
    device = device_of(model, None)
    saved_side, saved_pad = tokenizer.padding_side, tokenizer.pad_token
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad token nor an eos token to pad prompts with")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    outputs: list[str] = []
    try:
        with EvalMode(model):
            for start in range(0, len(prompts), batch_size):
                chunk = list(prompts[start : start + batch_size])
                enc = tokenizer(chunk, return_tensors="pt", padding=True, return_token_type_ids=False).to(device)
                generated = model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    num_beams=1,
                    pad_token_id=tokenizer.pad_token_id,
                )
                new_tokens = generated[:, enc["input_ids"].shape[1] :]
                outputs.extend(t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = saved_side
        if saved_pad is None:
            tokenizer.pad_token = None
    return outputs
