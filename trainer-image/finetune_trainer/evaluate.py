"""Evaluation: validation metrics, calibration, early stopping, the retention check and the gain over the base model.

Read top to bottom:

1. :func:`evaluate_lm` and :func:`evaluate_classification` run a model over an evaluation dataloader and return
   plain ``float`` metrics (ready for progress.json and the model card). Both are exact across uneven batches and
   across ranks: they sum per-example statistics, gather them with ``accelerator.gather_for_metrics`` (which drops
   the samples accelerate repeats to even out the last batch) and divide once at the end.
2. :func:`generate_and_score` greedily generates completions and scores them with sacrebleu (BLEU) and
   rouge-score (ROUGE-L); :func:`prompts_and_references` recovers prompts and references from tokenised rows.
3. :func:`expected_calibration_error`, :func:`fit_temperature` and :func:`calibrate`: temperature scaling
   (Guo et al., 2017, "On Calibration of Modern Neural Networks") for classifiers.
4. :func:`majority_baseline`: the score of always predicting the most frequent training class, the floor a
   classifier has to beat to have learnt anything.
5. :class:`EarlyStopping`: a small, serialisable plateau detector whose state goes into checkpoints, and
   :func:`improves`, the one "is this better" test (direction from :mod:`finetune_api.metric_catalogue`).
6. :func:`retention_check` and :func:`gain`: catastrophic forgetting and improvement over the base model.

Library code does the metric arithmetic wherever a maintained library has it (scikit-learn for classification
metrics, sacrebleu, rouge-score); what is hand-written here is what none of them provides: ECE, the temperature
fit and the token-exact LM loss.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.nn.functional as F

from finetune_api import metric_catalogue
from finetune_api.metric_catalogue import Direction
from finetune_api.spec import EarlyStopping as EarlyStoppingSpec
from finetune_api.spec import RetentionSpec
from finetune_trainer.collate import IGNORE_INDEX
from finetune_trainer.errors import EmptyDataset, InvalidConfig, RetentionExceeded

if TYPE_CHECKING:
    from accelerate import Accelerator
    from transformers import PreTrainedTokenizerBase

_T = TypeVar("_T")

ECE_BINS = 15
# Temperatures outside this range mean the fit ran away (e.g. perfectly separable validation logits, where NLL keeps
# falling as T -> 0); clamping keeps the calibrated probabilities usable.
MIN_TEMPERATURE = 1e-2
MAX_TEMPERATURE = 1e2
GENERATION_METRICS = tuple(metric_catalogue.GENERATION_METRICS)  # the evaluation.metrics entries: bleu, rouge

__all__ = [
    "ECE_BINS",
    "EarlyStopping",
    "calibrate",
    "evaluate_classification",
    "evaluate_lm",
    "expected_calibration_error",
    "fit_temperature",
    "gain",
    "generate_and_score",
    "improves",
    "majority_baseline",
    "perplexity",
    "prompts_and_references",
    "retention_check",
    "score_texts",
]


# ------------------------------------------------------------------------------------------ helpers


def _device_of(model: torch.nn.Module, accelerator: Accelerator | None) -> torch.device:
    if accelerator is not None:
        return accelerator.device
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def _model_inputs(model: torch.nn.Module, batch: Mapping[str, Any]) -> dict[str, Any]:
    """Everything but the labels (the metrics here compute their own loss from the logits, see evaluate_lm), and
    ``use_cache=False`` where the model has a KV cache: scoring needs none, and with a cache transformers ignores
    packed ``position_ids`` and lets packed rows attend to each other."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if getattr(getattr(model, "config", None), "use_cache", None) is not None:
        inputs["use_cache"] = False
    return inputs


def _batches(dataloader: Iterable[Mapping[str, Any]], max_batches: int | None) -> Iterator[Mapping[str, Any]]:
    """Iterate, stopping after ``max_batches``.

    Stopping early inside an accelerate-prepared dataloader skips its ``end()``, which would leave it registered
    as the active dataloader and confuse gradient-accumulation sync in the training loop that called us; so we
    call ``end()`` ourselves.
    """
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be at least 1, got {max_batches}")
    iterator = iter(dataloader)
    stopped_early = False
    try:
        for index, batch in enumerate(iterator):
            yield batch
            if max_batches is not None and index + 1 >= max_batches:
                stopped_early = True
                break
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()
        if stopped_early and hasattr(dataloader, "end") and hasattr(dataloader, "gradient_state"):
            dataloader.end()


def _gather(accelerator: Accelerator | None, tensors: _T) -> _T:
    return tensors if accelerator is None else accelerator.gather_for_metrics(tensors)


class _EvalMode:
    """``model.eval()`` for the duration, then the previous mode back (evaluation runs mid-training)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.was_training = model.training

    def __enter__(self) -> None:
        self.model.eval()

    def __exit__(self, *exc: object) -> None:
        self.model.train(self.was_training)


def perplexity(loss: float) -> float:
    """``exp(loss)``; ``inf`` instead of an OverflowError when a diverged run reports a huge loss."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


# ------------------------------------------------------------------------------------------- causal LM


@torch.no_grad()
def evaluate_lm(
    model: torch.nn.Module,
    dataloader: Iterable[Mapping[str, torch.Tensor]],
    *,
    accelerator: Accelerator | None = None,
    max_batches: int | None = None,
) -> dict[str, float]:
    """Token-weighted loss, perplexity and next-token accuracy of a causal LM.

    Batches hold ``input_ids`` and ``labels`` (``-100`` = not scored) and optionally ``attention_mask`` /
    ``position_ids`` (packed rows). As in every Hugging Face causal LM, the logits at position ``t`` are scored
    against ``labels[t + 1]``; packing collators mark the first token of each packed row ``-100`` so no loss
    crosses a row boundary.

    ``eval_loss`` is the mean over *all* scored tokens of the set, not a mean of per-batch means (which would
    over-weight short batches). The loss is computed here from the logits, in float32, per row, instead of taking
    the model's batch-mean ``loss``: per-row sums are what ``accelerator.gather_for_metrics`` can de-duplicate when
    accelerate pads the last batch of a distributed eval with repeated rows, so the result is exact on any number
    of ranks. It is the same quantity the model's own loss computes (a test checks this).

    Pass an accelerator-prepared dataloader when ``accelerator`` is given; every rank gets the global result.
    """
    device = _device_of(model, accelerator)
    loss_sum = 0.0
    tokens = 0
    correct = 0
    with _EvalMode(model):
        for batch in _batches(dataloader, max_batches):
            batch = _to_device(batch, device)
            if "labels" not in batch:
                raise ValueError("evaluate_lm needs 'labels' in every batch (use -100 for tokens that are not scored)")
            logits = model(**_model_inputs(model, batch)).logits
            row_stats = _lm_row_stats(logits, batch["labels"])
            row_stats = _gather(accelerator, row_stats).to("cpu", torch.float64)
            loss_sum += float(row_stats[:, 0].sum())
            tokens += int(row_stats[:, 1].sum())
            correct += int(row_stats[:, 2].sum())
    if tokens == 0:
        raise EmptyDataset(
            "the evaluation set has no scored tokens (every label is -100): check that validation rows have "
            "completions / assistant turns and are not truncated away by maxSeqLength"
        )
    loss = loss_sum / tokens
    return {
        "eval_loss": loss,
        "perplexity": perplexity(loss),
        "token_accuracy": correct / tokens,
        "eval_tokens": float(tokens),
    }


def _lm_row_stats(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``[rows, 3]`` float64: summed token NLL, scored tokens and correct argmax predictions per row.

    One row at a time so the float32 upcast of the logits costs one row's memory, not the batch's
    (vocabularies of 100k+ tokens make that a real difference).
    """
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)}")
    shifted = labels[:, 1:].long()
    rows = []
    for row in range(labels.shape[0]):  # no host sync inside: fine on GPU
        target = shifted[row]
        keep = target != IGNORE_INDEX
        row_logits = logits[row, :-1].float()
        nll = F.cross_entropy(row_logits, target, ignore_index=IGNORE_INDEX, reduction="sum")
        hits = ((row_logits.argmax(dim=-1) == target) & keep).sum()
        rows.append(torch.stack([nll.double(), keep.sum().double(), hits.double()]))
    if not rows:
        return torch.zeros(0, 3, dtype=torch.float64, device=labels.device)
    return torch.stack(rows)


# -------------------------------------------------------------------------------------- classification


@torch.no_grad()
def evaluate_classification(
    model: torch.nn.Module,
    dataloader: Iterable[Mapping[str, torch.Tensor]],
    *,
    num_labels: int,
    label_names: Sequence[str] | None = None,
    accelerator: Accelerator | None = None,
    temperature: float = 1.0,
    return_logits: bool = False,
) -> dict[str, Any]:
    """Accuracy, macro precision/recall/F1, per-class scores, loss and ECE of a sequence classifier.

    ``eval_loss`` is the unweighted mean cross-entropy of ``logits / temperature`` (class weights used in training
    are deliberately not applied, so runs with and without them compare). ``ece`` is computed on
    ``softmax(logits / temperature)`` with :data:`ECE_BINS` bins: pass the fitted temperature to report calibrated
    numbers on the test set. Accuracy and F1 do not depend on the temperature.

    Macro averages follow scikit-learn's default: over the classes that occur in the labels or the predictions,
    so a class absent from a small evaluation set does not count as a zero. ``per_class`` lists every class.

    With ``return_logits`` the result also holds ``logits`` (raw, before temperature, float32 on CPU) and
    ``labels`` for :func:`calibrate`; drop them before writing the dict anywhere.
    """
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    if num_labels < 2:
        raise ValueError(f"num_labels must be at least 2, got {num_labels}")
    if temperature <= 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature must be a positive number, got {temperature}")
    names = [str(i) for i in range(num_labels)] if label_names is None else [str(n) for n in label_names]
    if len(names) != num_labels:
        raise ValueError(f"got {len(names)} label_names for num_labels={num_labels}")
    if len(set(names)) != len(names):
        raise ValueError("label_names must be unique")

    device = _device_of(model, accelerator)
    all_logits: list[torch.Tensor] = []
    all_labels: list[torch.Tensor] = []
    with _EvalMode(model):
        for batch in _batches(dataloader, None):
            batch = _to_device(batch, device)
            if "labels" not in batch:
                raise ValueError("evaluate_classification needs 'labels' (class ids) in every batch")
            logits = model(**_model_inputs(model, batch)).logits.float()
            logits, labels = _gather(accelerator, (logits, batch["labels"]))
            all_logits.append(logits.to("cpu"))
            all_labels.append(labels.to("cpu").long())
    if not all_logits:
        raise EmptyDataset("the classification evaluation set is empty")
    logits = torch.cat(all_logits)
    labels = torch.cat(all_labels)
    if logits.ndim != 2 or logits.shape[1] != num_labels:
        raise ValueError(f"model returned logits of shape {tuple(logits.shape)}, expected (N, {num_labels})")
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_labels):
        raise ValueError(f"labels must be class ids in [0, {num_labels}); got {labels.min()}..{labels.max()}")

    scaled = logits / temperature
    preds = scaled.argmax(dim=1)
    y_true, y_pred = labels.numpy(), preds.numpy()
    precision, recall, f1, _ = precision_recall_fscore_support(y_true, y_pred, average="macro", zero_division=0)
    per_p, per_r, per_f, per_s = precision_recall_fscore_support(
        y_true, y_pred, labels=list(range(num_labels)), average=None, zero_division=0
    )
    result: dict[str, Any] = {
        "eval_loss": float(F.cross_entropy(scaled.double(), labels)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "precision_macro": float(precision),
        "recall_macro": float(recall),
        "f1_macro": float(f1),
        "ece": expected_calibration_error(scaled.softmax(dim=1), labels, n_bins=ECE_BINS),
        "eval_samples": float(labels.numel()),
        "per_class": {
            name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for name, p, r, f, s in zip(names, per_p, per_r, per_f, per_s)
        },
    }
    if return_logits:
        result["logits"] = logits
        result["labels"] = labels
    return result


# ------------------------------------------------------------------------------------ generation metrics


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
    device = _device_of(model, None)
    saved_side, saved_pad = tokenizer.padding_side, tokenizer.pad_token
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad token nor an eos token to pad prompts with")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    outputs: list[str] = []
    try:
        with _EvalMode(model):
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


# ------------------------------------------------------------------------------------------ calibration


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = ECE_BINS) -> float:
    """Expected calibration error of the top-class confidence (Guo et al., 2017).

    Confidences fall into ``n_bins`` equal-width bins ``(k/n, (k+1)/n]``; ECE is the sample-weighted mean of
    ``|accuracy - mean confidence|`` over the bins. ``probs`` is ``(N, K)`` with rows summing to 1.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be at least 1, got {n_bins}")
    probs = probs.detach().to("cpu", torch.float64)
    labels = labels.detach().to("cpu").long().reshape(-1)
    if probs.ndim != 2 or probs.shape[0] != labels.shape[0]:
        raise ValueError(f"probs must be (N, K) and labels (N,); got {tuple(probs.shape)} and {tuple(labels.shape)}")
    if labels.numel() == 0:
        raise ValueError("expected_calibration_error needs at least one sample")
    confidence, predicted = probs.max(dim=1)
    correct = (predicted == labels).double()
    inner_edges = torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float64)[1:-1]
    bins = torch.bucketize(confidence, inner_edges, right=False)  # edges[k-1] < c <= edges[k]
    gap_sums = torch.zeros(n_bins, dtype=torch.float64)
    gap_sums.index_add_(0, bins, correct - confidence)  # per bin: n_b * (accuracy_b - confidence_b)
    return float(gap_sums.abs().sum() / labels.numel())


def _nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float | torch.Tensor = 1.0) -> torch.Tensor:
    return F.cross_entropy(logits / temperature, labels)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature ``T > 0`` minimising the NLL of ``softmax(logits / T)`` (temperature scaling).

    Optimised over ``log T`` with L-BFGS in float64, clamped to [0.01, 100]; falls back to ``1.0`` if the fit does
    not beat it (so calibrating never makes the validation NLL worse).
    """
    logits = logits.detach().to("cpu", torch.float64)
    labels = labels.detach().to("cpu").long().reshape(-1)
    if logits.ndim != 2 or logits.shape[0] != labels.shape[0] or labels.numel() == 0:
        raise ValueError(f"logits must be (N, K) and labels (N,) with N > 0; got {tuple(logits.shape)}, {tuple(labels.shape)}")
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [log_t], lr=1.0, max_iter=200, tolerance_grad=1e-10, tolerance_change=1e-12, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = _nll(logits, labels, log_t.exp())
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    temperature = float(log_t.detach().exp().clamp(MIN_TEMPERATURE, MAX_TEMPERATURE))
    if not math.isfinite(temperature) or float(_nll(logits, labels, temperature)) > float(_nll(logits, labels)):
        return 1.0
    return temperature


def calibrate(logits_val: torch.Tensor, labels_val: torch.Tensor) -> dict[str, float]:
    """Fit temperature scaling on validation logits and report ECE and NLL before and after, on that same set.

    The "after" numbers are optimistic (the temperature was fitted on them); evaluate the test set with
    ``evaluate_classification(..., temperature=result["temperature"])`` for an unbiased ECE.
    """
    logits = logits_val.detach().to("cpu", torch.float64)
    labels = labels_val.detach().to("cpu").long().reshape(-1)
    temperature = fit_temperature(logits, labels)
    return {
        "temperature": temperature,
        "ece_before": expected_calibration_error(logits.softmax(dim=1), labels),
        "ece_after": expected_calibration_error((logits / temperature).softmax(dim=1), labels),
        "nll_before": float(_nll(logits, labels)),
        "nll_after": float(_nll(logits, labels, temperature)),
    }


def majority_baseline(train_labels: list[int], eval_labels: list[int], num_labels: int) -> dict[str, float]:
    """Accuracy and macro F1 on ``eval_labels`` of always predicting the most frequent training class.

    Ties go to the lowest class id. Macro F1 uses the same convention as :func:`evaluate_classification`.
    """
    from sklearn.metrics import accuracy_score, f1_score

    if not train_labels or not eval_labels:
        raise EmptyDataset("majority_baseline needs non-empty train and evaluation labels")
    bad = [y for y in (*train_labels, *eval_labels) if not 0 <= int(y) < num_labels]
    if bad:
        raise ValueError(f"labels must be class ids in [0, {num_labels}); got e.g. {bad[0]}")
    counts = Counter(int(y) for y in train_labels)
    majority = min(counts, key=lambda c: (-counts[c], c))
    predicted = [majority] * len(eval_labels)
    return {
        "accuracy": float(accuracy_score(eval_labels, predicted)),
        "f1_macro": float(f1_score(eval_labels, predicted, average="macro", zero_division=0)),
        "majority_class": float(majority),
    }


# --------------------------------------------------------------------------------------- early stopping


def improves(value: float, best: float | None, direction: Direction, min_delta: float = 0.0) -> bool:
    """Whether ``value`` beats ``best`` by more than ``min_delta`` in ``direction`` (the first value always does).

    The one comparison behind early stopping, best-checkpoint selection and the gain's verdict, so that
    they can never disagree on which way is better. NaN never improves.
    """
    if math.isnan(value):
        return False
    if best is None:
        return True
    return value < best - min_delta if direction == "min" else value > best + min_delta


class EarlyStopping:
    """Stop when ``metric`` has not improved by more than ``min_delta`` for ``patience`` evaluations in a row.

    Pure and serialisable: :meth:`state_dict` goes into every checkpoint so a resumed run stops exactly where an
    uninterrupted one would. The first value seen is always the best. NaN never counts as an improvement.
    """

    def __init__(self, metric: str, mode: str, patience: int, min_delta: float):
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if patience < 1:
            raise ValueError(f"patience must be at least 1, got {patience}")
        if min_delta < 0:
            raise ValueError(f"min_delta must be non-negative, got {min_delta}")
        self.metric = metric
        self.mode: Direction = "min" if mode == "min" else "max"
        self.patience = int(patience)
        self.min_delta = float(min_delta)
        self._best: float | None = None
        self._best_step: int | None = None
        self._bad_evals = 0

    @classmethod
    def from_spec(cls, spec: EarlyStoppingSpec) -> "EarlyStopping":
        """From ``spec.evaluation.early_stopping``; its mode follows the metric's direction when unset."""
        return cls(metric=spec.metric, mode=spec.direction, patience=spec.patience, min_delta=spec.min_delta)

    @property
    def best(self) -> float | None:
        return self._best

    @property
    def best_step(self) -> int | None:
        return self._best_step

    @property
    def bad_evals(self) -> int:
        return self._bad_evals

    @property
    def should_stop(self) -> bool:
        return self._bad_evals >= self.patience

    def is_improvement(self, value: float) -> bool:
        return improves(value, self._best, self.mode, self.min_delta)

    def update(self, value: float, step: int) -> bool:
        """Record one evaluation; True when ``value`` is the new best."""
        value = float(value)
        if self.is_improvement(value):
            self._best, self._best_step, self._bad_evals = value, int(step), 0
            return True
        self._bad_evals += 1
        return False

    def update_from(self, metrics: Mapping[str, Any], step: int) -> bool:
        """:meth:`update` with ``metrics[self.metric]``, failing with a usable message when it was not computed."""
        if self.metric not in metrics:
            available = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)))
            raise InvalidConfig(
                f"evaluation.earlyStopping.metric {self.metric!r} is not among the computed metrics {available}"
            )
        return self.update(metrics[self.metric], step)

    def state_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "mode": self.mode,
            "patience": self.patience,
            "min_delta": self.min_delta,
            "best": self._best,
            "best_step": self._best_step,
            "bad_evals": self._bad_evals,
        }

    def load_state_dict(self, d: Mapping[str, Any]) -> None:
        """Restore the counters. The metric and mode must match: the spec is immutable, so a mismatch means the
        checkpoint belongs to another job. Patience and min_delta come from this object (the current spec)."""
        if d.get("metric") != self.metric or d.get("mode") != self.mode:
            raise ValueError(
                f"early-stopping state monitors {d.get('metric')!r} ({d.get('mode')}), "
                f"this run monitors {self.metric!r} ({self.mode})"
            )
        self._best = None if d.get("best") is None else float(d["best"])
        self._best_step = None if d.get("best_step") is None else int(d["best_step"])
        self._bad_evals = int(d.get("bad_evals", 0))


# ----------------------------------------------------------------------------- retention and the gain


def retention_check(loss_before: float, loss_after: float, spec: RetentionSpec) -> dict[str, Any]:
    """Relative loss increase on general (retention) data from the base model to the fine-tuned one.

    Raises :class:`RetentionExceeded` when it is above ``spec.max_loss_increase`` and ``spec.action`` is
    ``fail``; with ``warn`` the result says ``passed: False`` and the caller logs it.
    """
    loss_before, loss_after = float(loss_before), float(loss_after)
    if loss_before > 0:
        relative = (loss_after - loss_before) / loss_before
    else:
        relative = 0.0 if loss_after <= loss_before else math.inf
    threshold = float(spec.max_loss_increase)
    passed = relative <= threshold  # False for NaN: a diverged model does not pass
    result = {
        "loss_before": loss_before,
        "loss_after": loss_after,
        "relative_increase": relative,
        "threshold": threshold,
        "passed": passed,
        "action": spec.action,
    }
    if not passed and spec.action == "fail":
        raise RetentionExceeded(
            f"loss on the retention set rose from {loss_before:.4f} to {loss_after:.4f} "
            f"({relative:+.1%}), above evaluation.retention.maxLossIncrease {threshold:.1%}: the model forgot "
            "general ability. Lower the learning rate or epochs, use a LoRA method, mix general data into train, "
            "or raise maxLossIncrease / set action warn"
        )
    return result


def gain(baseline: Mapping[str, Any], final: Mapping[str, Any], metric: str, mode: str) -> dict[str, Any]:
    """How ``metric`` moved from the base model to the fine-tuned one.

    ``delta`` is ``final - baseline`` (negative is better when ``mode`` is ``min``); ``relative`` is ``delta``
    over ``|baseline|`` (None when the baseline is 0); ``improved`` reads the sign according to ``mode``.
    """
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
    for name, metrics in (("baseline", baseline), ("final", final)):
        if metric not in metrics:
            raise ValueError(f"metric {metric!r} missing from the {name} evaluation (has {sorted(metrics)})")
    before, after = float(baseline[metric]), float(final[metric])
    delta = after - before
    return {
        "metric": metric,
        "baseline": before,
        "final": after,
        "delta": delta,
        "relative": None if before == 0 else delta / abs(before),
        "improved": delta < 0 if mode == "min" else delta > 0,
    }
