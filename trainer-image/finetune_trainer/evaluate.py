"""Evaluation: validation metrics, early stopping, the retention check and the gain over the base model
(generation metrics live in :mod:`finetune_trainer.generation`, temperature scaling in
:mod:`finetune_trainer.calibration`, early stopping and "is this better" in :mod:`finetune_trainer.early_stopping`).

Read top to bottom:

1. :func:`evaluate_lm` and :func:`evaluate_classification` run a model over an evaluation dataloader and return
   plain ``float`` metrics (ready for progress.json and the model card). Both are exact across uneven batches and
   across ranks: they sum per-example statistics, gather them with ``accelerator.gather_for_metrics`` (which drops
   the samples accelerate repeats to even out the last batch) and divide once at the end.
2. The baselines of a classifier: :func:`majority_baseline`, the score of always predicting the most frequent
   training class (the floor a classifier has to beat to have learnt anything), and :func:`linear_probe`, a
   logistic regression on the frozen encoder's features (:func:`frozen_features`), the fair "no fine-tuning"
   comparison.
3. :func:`retention_check` and :func:`gain`: catastrophic forgetting and improvement over the base model.

Library code does the metric arithmetic wherever a maintained library has it (scikit-learn for classification
metrics, sacrebleu, rouge-score); what is hand-written here is what none of them provides: ECE, the temperature
fit and the token-exact LM loss.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.nn.functional as F

from finetune_api.spec import RetentionSpec
from finetune_trainer.calibration import ECE_BINS, expected_calibration_error
from finetune_trainer.collate import IGNORE_INDEX
from finetune_trainer.errors import EmptyDataset, RetentionExceeded

if TYPE_CHECKING:
    from accelerate import Accelerator

_T = TypeVar("_T")


__all__ = [
    "LINEAR_PROBE_MAX_TRAIN",
    "classification_metrics",
    "evaluate_classification",
    "evaluate_lm",
    "frozen_features",
    "gain",
    "linear_probe",
    "majority_baseline",
    "perplexity",
    "retention_check",
]


# ------------------------------------------------------------------------------------------ helpers


def device_of(model: torch.nn.Module, accelerator: Accelerator | None) -> torch.device:
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


class EvalMode:
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
    shift: bool = True,
) -> dict[str, float]:
    """Token-weighted loss, perplexity and next-token accuracy of a causal LM (``shift`` False: of an
    encoder-decoder, whose logits at ``t`` are scored against ``labels[t]``).

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
    device = device_of(model, accelerator)
    loss_sum = 0.0
    tokens = 0
    correct = 0
    with EvalMode(model):
        for batch in _batches(dataloader, max_batches):
            batch = _to_device(batch, device)
            if "labels" not in batch:
                raise ValueError("evaluate_lm needs 'labels' in every batch (use -100 for tokens that are not scored)")
            logits = model(**_model_inputs(model, batch)).logits
            row_stats = _lm_row_stats(logits, batch["labels"], shift=shift)
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


def _lm_row_stats(logits: torch.Tensor, labels: torch.Tensor, *, shift: bool = True) -> torch.Tensor:
    """``[rows, 3]`` float64: summed token NLL, scored tokens and correct argmax predictions per row.

    One row at a time so the float32 upcast of the logits costs one row's memory, not the batch's
    (vocabularies of 100k+ tokens make that a real difference).
    """
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)}")
    shifted = (labels[:, 1:] if shift else labels).long()
    rows = []
    for row in range(labels.shape[0]):  # no host sync inside: fine on GPU
        target = shifted[row]
        keep = target != IGNORE_INDEX
        row_logits = (logits[row, :-1] if shift else logits[row]).float()
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

    if num_labels < 2:
        raise ValueError(f"num_labels must be at least 2, got {num_labels}")
    if temperature <= 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature must be a positive number, got {temperature}")
    names = [str(i) for i in range(num_labels)] if label_names is None else [str(n) for n in label_names]
    if len(names) != num_labels:
        raise ValueError(f"got {len(names)} label_names for num_labels={num_labels}")
    if len(set(names)) != len(names):
        raise ValueError("label_names must be unique")

    device = device_of(model, accelerator)
    all_logits: list[torch.Tensor] = []
    all_labels: list[torch.Tensor] = []
    with EvalMode(model):
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

    result = classification_metrics(logits, labels, names, temperature=temperature)
    if return_logits:
        result["logits"] = logits
        result["labels"] = labels
    return result


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, names: Sequence[str], *, temperature: float = 1.0) -> dict[str, Any]:
    """The metrics of :func:`evaluate_classification` from ``(N, K)`` logits (or log-probabilities) and class ids."""
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    scaled = logits.double() / temperature
    preds = scaled.argmax(dim=1)
    y_true, y_pred = labels.numpy(), preds.numpy()
    precision, recall, f1, _ = precision_recall_fscore_support(y_true, y_pred, average="macro", zero_division=0)
    per_p, per_r, per_f, per_s = precision_recall_fscore_support(
        y_true, y_pred, labels=list(range(len(names))), average=None, zero_division=0
    )
    return {
        "eval_loss": float(F.cross_entropy(scaled, labels)),
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


# ------------------------------------------------------------------------------------------ baselines


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


LINEAR_PROBE_MAX_TRAIN = 4096  # training rows (a seeded sample) whose frozen features fit the linear probe


@torch.no_grad()
def frozen_features(
    model: torch.nn.Module, dataloader: Iterable[Mapping[str, torch.Tensor]], *, accelerator: Accelerator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features, labels)``: the model's last hidden state, mean-pooled over each row's real tokens.

    The features a linear probe is fitted on: the encoder as pretrained (run it before training; a fresh LoRA
    adapter is a no-op, a fresh head is not used). Gathered across ranks like :func:`evaluate_classification`.
    """
    device = device_of(model, accelerator)
    features: list[torch.Tensor] = []
    all_labels: list[torch.Tensor] = []
    with EvalMode(model):
        for batch in _batches(dataloader, None):
            batch = _to_device(batch, device)
            hidden = model(**_model_inputs(model, batch), output_hidden_states=True).hidden_states[-1].float()
            mask = batch.get("attention_mask")
            mask = torch.ones(hidden.shape[:2], device=hidden.device) if mask is None else mask.to(hidden.dtype)
            pooled = (hidden * mask.unsqueeze(-1)).sum(dim=1) / mask.sum(dim=1, keepdim=True).clamp_min(1.0)
            pooled, labels = _gather(accelerator, (pooled, batch["labels"]))
            features.append(pooled.to("cpu"))
            all_labels.append(labels.to("cpu").long())
    if not features:
        raise EmptyDataset("no rows to extract features from")
    return torch.cat(features), torch.cat(all_labels)


def linear_probe(
    train_features: torch.Tensor, train_labels: torch.Tensor, eval_features: torch.Tensor, eval_labels: torch.Tensor,
    names: Sequence[str], *, seed: int = 0,
) -> dict[str, Any] | None:
    """The no-fine-tune baseline of an encoder: scikit-learn's ``LogisticRegression`` (standardised features,
    L2, lbfgs) fitted on frozen training features, scored on ``eval_*`` with :func:`classification_metrics`.

    None when the training labels hold a single class (nothing to fit; the majority baseline says the same).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    y = train_labels.numpy()
    classes = sorted(set(int(c) for c in y))
    if len(classes) < 2:
        return None
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
    probe.fit(train_features.double().numpy(), y)
    probs = torch.zeros(eval_features.shape[0], len(names), dtype=torch.float64)
    probs[:, classes] = torch.from_numpy(probe.predict_proba(eval_features.double().numpy()))
    result = classification_metrics(probs.clamp_min(1e-12).log(), eval_labels, names)
    result["train_samples"] = float(len(y))
    return result


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
