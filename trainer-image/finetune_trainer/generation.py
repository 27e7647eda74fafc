"""Generation metrics: greedy (or beam-search) completions of evaluation prompts, scored with sacrebleu (BLEU) and
rouge-score (ROUGE-L; ROUGE-1 and ROUGE-2 too for seq2seq-lm).

:func:`prompts_and_references` recovers each row's prompt *token ids* (exactly as in training: the chat
template's special tokens included) and its reference text, :func:`sample_rows` picks the evaluated rows
(seeded, stratified by reference when the completions are a few labels), :func:`generate_greedy` completes
a left-padded batch of prompt ids (an encoder-decoder's from its right-padded source, :mod:`.seq2seq`), :func:`score_texts` scores hypotheses against references and
:func:`generate_and_score` does the last two. :class:`FewShot` builds the k-shot prompts of the base-model
baseline from training rows.
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from finetune_api import metric_catalogue
from finetune_trainer.collate import IGNORE_INDEX
from finetune_trainer.errors import EmptyDataset
from finetune_trainer.evaluate import EvalMode, device_of

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

GENERATION_METRICS = tuple(metric_catalogue.GENERATION_METRICS)  # the evaluation.metrics entries: bleu, rouge

__all__ = [
    "GENERATION_METRICS", "FewShot", "generate_and_score", "generate_greedy", "label_like", "prompt_spans",
    "prompts_and_references", "sample_rows", "score_texts",
]


class _WordTokenizer:
    """Lower-cased Unicode word tokens for ROUGE.

    rouge-score's default tokenizer keeps only ``[a-z0-9]`` and so scores any non-English text as empty; this one
    keeps every Unicode letter and digit. No stemming: it is English-only.
    """

    _word = re.compile(r"\w+", re.UNICODE)

    def tokenize(self, text: str) -> list[str]:
        return self._word.findall(text.lower())


ROUGE_NAMES = {"rouge1": "rouge_1", "rouge2": "rouge_2", "rougeL": "rouge_l"}  # rouge-score's type -> our metric name


def score_texts(
    hypotheses: Sequence[str], references: Sequence[str], *, metrics: Sequence[str] = GENERATION_METRICS,
    rouge_types: Sequence[str] = ("rougeL",),
) -> dict[str, float]:
    """Corpus BLEU (sacrebleu, 0-100, default 13a tokenisation) and mean ROUGE F1 of each of ``rouge_types``
    (rouge-score, 0-1; ROUGE-L alone by default, reported as ``rouge_l``, ``rouge_1``, ``rouge_2``); when the
    references are a few labels (:func:`label_like`: classification as generation), also ``label_accuracy``, the
    share of completions that are exactly their label (case and surrounding whitespace aside)."""
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

        scorer = rouge_scorer.RougeScorer(list(rouge_types), tokenizer=_WordTokenizer())
        scored = [scorer.score(ref, hyp) for hyp, ref in zip(hypotheses, references)]
        for kind in rouge_types:
            scores[ROUGE_NAMES[kind]] = float(sum(s[kind].fmeasure for s in scored) / len(scored))
    if label_like(references):
        same = [" ".join(h.split()).casefold() == " ".join(r.split()).casefold() for h, r in zip(hypotheses, references)]
        scores["label_accuracy"] = sum(same) / len(same)
    return scores


def _check_metrics(metrics: Sequence[str]) -> None:
    unknown = sorted(set(metrics) - set(GENERATION_METRICS))
    if unknown:
        raise ValueError(f"unknown generation metrics {unknown}; known: {list(GENERATION_METRICS)}")


def prompt_spans(input_ids: Sequence[int], labels: Sequence[int]) -> tuple[list[int], list[int]] | None:
    """``(prompt ids, reference ids)`` of one tokenised row, or None when it has no prompt or nothing scored.

    The prompt is everything before the first scored token (for chat rows: the rendered conversation up to and
    including the template's generation prompt, special tokens and all), the reference the first scored span (a
    completion or an assistant turn, with its end-of-turn / EOS token).
    """
    ids, labels = list(input_ids), list(labels)
    first = next((i for i, t in enumerate(labels) if t != IGNORE_INDEX), None)
    if not first:  # no prompt (plain text rows) or nothing scored
        return None
    end = next((i for i in range(first, len(labels)) if labels[i] == IGNORE_INDEX), len(labels))
    return ids[:first], ids[first:end]


def prompts_and_references(rows: Iterable[Mapping[str, Any]], tokenizer: PreTrainedTokenizerBase) -> tuple[list[list[int]], list[str]]:
    """Prompt token ids and reference texts of tokenised rows (``input_ids``, ``labels``); see :func:`prompt_spans`.

    The prompts stay token ids: decoding and re-tokenising would drop the chat template's special tokens
    (``skip_special_tokens``) or re-split the text, and the model would be scored on a format it never saw.
    Rows with no prompt (plain text) or nothing scored are skipped.
    """
    prompts, references = [], []
    for row in rows:
        spans = prompt_spans(row["input_ids"], row["labels"])
        if spans is None:
            continue
        prompts.append(spans[0])
        references.append(tokenizer.decode(spans[1], skip_special_tokens=True).strip())
    return prompts, references


MAX_GENERATED_LABELS = 32  # at most this many distinct references: the completions are labels (classification as generation)


def label_like(references: Sequence[Any]) -> bool:
    """Whether the references are a few labels repeated (classification as generation) rather than free text:
    at most :data:`MAX_GENERATED_LABELS` distinct values, each seen twice on average."""
    distinct = len(set(references))
    return 1 < distinct <= MAX_GENERATED_LABELS and 2 * distinct <= len(references)


def sample_rows(references: Sequence[Any], limit: int, seed: int) -> list[int]:
    """Indices (ascending) of up to ``limit`` of the rows whose references are ``references``, drawn with ``seed``.

    A seeded sample instead of the first ``limit`` rows, whose order is the file's (often sorted by source, topic
    or label). When the references are labels (:func:`label_like`), the sample is stratified: each label gets its
    share of ``limit`` (largest remainders first, ties to the more frequent label), so a small sample of a skewed
    set still holds every label it can. The same seed gives the same rows at every evaluation.
    """
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    n = len(references)
    if n <= limit:
        return list(range(n))
    rng = random.Random(seed)
    if not label_like(references):
        return sorted(rng.sample(range(n), limit))
    groups: dict[Any, list[int]] = defaultdict(list)
    for i, ref in enumerate(references):
        groups[ref].append(i)
    order = sorted(groups, key=lambda g: (-len(groups[g]), groups[g][0]))  # deterministic, independent of hashing
    exact = {g: limit * len(groups[g]) / n for g in order}
    quota = {g: int(exact[g]) for g in order}
    for g in sorted(order, key=lambda g: -(exact[g] - quota[g]))[: limit - sum(quota.values())]:
        quota[g] += 1
    chosen: list[int] = []
    for g in order:
        chosen += rng.sample(groups[g], quota[g])
    return sorted(chosen)


@dataclass(frozen=True)
class FewShot:
    """The k-shot prompts of the base-model baseline: ``k`` training rows (drawn with the seed) shown before each
    evaluated prompt, as the in-context-learning literature compares fine-tuning against.

    Built from token ids like everything here: each demonstration is a training row's prompt and reference
    (for chat rows the whole rendered turn, template markers included; for prompt-completion rows without the
    closing EOS, which would end the document), separated by a blank line; a leading BOS is kept once, at the
    start. :meth:`prompt` drops demonstrations from the front when the prompt would not fit ``max_length``.
    """

    demonstrations: tuple[tuple[int, ...], ...]
    train_rows: tuple[int, ...]  # the training rows shown, in order
    bos: tuple[int, ...]  # (bos,) when the rows start with it
    separator: tuple[int, ...]

    @classmethod
    def from_train(cls, train: Sequence[Mapping[str, Any]], tokenizer: PreTrainedTokenizerBase, *, k: int, seed: int,
                   keep_eos: bool = False) -> FewShot | None:
        """``k`` demonstrations drawn with ``seed`` from the training rows that have a prompt and a reference (the
        first ``k`` such rows of a seeded permutation of ``train``); None when ``k`` is 0 or no row has one.
        ``keep_eos``: chat rows, where EOS may be the template's end-of-turn token."""
        if k < 0:
            raise ValueError(f"k must be at least 0, got {k}")
        if k == 0 or len(train) == 0:
            return None
        order = list(range(len(train)))
        random.Random(seed).shuffle(order)
        picked: list[tuple[int, list[int]]] = []
        for index in order:  # reads only as many rows as it needs, however large train is
            row = train[index]
            spans = prompt_spans(row["input_ids"], row["labels"])
            if spans is not None:
                picked.append((index, spans[0] + spans[1]))
                if len(picked) == k:
                    break
        if not picked:
            return None
        bos_id, eos_id = tokenizer.bos_token_id, tokenizer.eos_token_id
        bos = (bos_id,) if bos_id is not None and picked[0][1][:1] == [bos_id] else ()
        demos = []
        for _, ids in picked:
            ids = _strip_bos(ids, bos)
            if not keep_eos and eos_id is not None and ids[-1:] == [eos_id]:
                ids = ids[:-1]
            demos.append(tuple(ids))
        separator = tuple(tokenizer("\n\n", add_special_tokens=False)["input_ids"])
        return cls(tuple(demos), tuple(i for i, _ in picked), bos, separator)

    @property
    def k(self) -> int:
        return len(self.demonstrations)

    def prompt(self, prompt_ids: Sequence[int], max_length: int | None = None) -> tuple[list[int], int]:
        """``(ids, demonstrations used)``: BOS, the demonstrations, then ``prompt_ids`` (its BOS moved to the front)."""
        body = _strip_bos(list(prompt_ids), self.bos)
        demos = list(self.demonstrations)
        while True:
            ids = list(self.bos)
            for demo in demos:
                ids += list(demo) + list(self.separator)
            ids += body
            if max_length is None or len(ids) <= max_length or not demos:
                return ids, len(demos)
            demos = demos[1:]


def _strip_bos(ids: list[int], bos: tuple[int, ...]) -> list[int]:
    return ids[len(bos):] if bos and ids[: len(bos)] == list(bos) else ids


@torch.no_grad()
def generate_and_score(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Sequence[int]],
    references: Sequence[str],
    *,
    metrics: Sequence[str] = GENERATION_METRICS,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    num_beams: int = 1,
    rouge_types: Sequence[str] = ("rougeL",),
) -> dict[str, float]:
    """Greedy-decode (beam-search with ``num_beams`` > 1) a completion for each prompt (token ids, as in training)
    and score it against its reference with :func:`score_texts`. Run it on one process with the unwrapped model."""
    _check_metrics(metrics)
    if len(prompts) != len(references):
        raise ValueError(f"{len(prompts)} prompts for {len(references)} references")
    hypotheses = generate_greedy(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, num_beams=num_beams)
    return score_texts(hypotheses, references, metrics=metrics, rouge_types=rouge_types)


def left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of prompts padded on the left (a decoder-only model continues from the
    last position, so every row's last prompt token must sit in the last column)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if len(prompt):
            ids[row, width - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
            mask[row, width - len(prompt):] = 1
    return ids, mask


@torch.no_grad()
def generate_greedy(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Sequence[int]], *,
    max_new_tokens: int = 64, batch_size: int = 8, num_beams: int = 1,
) -> list[str]:
    """Greedy (``num_beams`` > 1: beam-search) completions of prompt token ids (new text only, special tokens
    skipped, stripped).

    Batches are left-padded with the pad token (EOS when the tokenizer has none) and masked, so a prompt's
    completion is the one it gets alone; the tokenizer is not touched. An encoder-decoder model's prompts are
    its encoder's input instead (:func:`.seq2seq.generate_from_sources`).
    """
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        from .seq2seq import generate_from_sources

        return generate_from_sources(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, num_beams=num_beams)
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError("max_new_tokens and batch_size must be at least 1")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad token nor an eos token to pad prompts with")
    device = device_of(model, None)
    outputs: list[str] = []
    with EvalMode(model):
        for start in range(0, len(prompts), batch_size):
            input_ids, attention_mask = left_pad(prompts[start : start + batch_size], pad)
            generated = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=num_beams,
                pad_token_id=pad,
            )
            new_tokens = generated[:, input_ids.shape[1] :]
            outputs.extend(t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    return outputs
