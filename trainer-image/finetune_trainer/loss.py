"""The loss of one micro-batch, normalised over the whole global batch of its accumulation window.

A window of ``gradientAccumulationSteps`` micro-batches on every rank is one optimizer step. Each
micro-batch's loss is a *sum* over its loss tokens (causal LM: every token whose label is not
``IGNORE_INDEX``; classification: every row, weighted by its class weight when
``preprocessing.classWeights`` is on), divided by :meth:`WindowLoss.denominator`: the window's total
over **all ranks** (all-reduced) divided by the world size. DDP and FSDP average gradients over the
ranks, so the step's gradient is that of ``sum of every rank's token losses / N_global``: the mean
token loss of the global batch, every token weighing ``1 / N_global`` however the rows fall into
micro-batches and ranks (as transformers' ``average_tokens_across_devices``). A per-rank denominator
would give a token ``1 / (world x n_rank)``, so ranks with short completions would count more.

With ``spec.distillation`` the sum is ``(1 - alpha) x task + alpha x KD`` over the same loss units
(:meth:`.distill.Teacher.mix`), so the same denominator keeps the mixed loss exact.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from . import distributed
from .collate import IGNORE_INDEX, label_tokens

if TYPE_CHECKING:
    from .distill import Teacher

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class WindowLoss:
    classification: bool
    class_weights: torch.Tensor | None = None  # classification only, on the training device
    shift: bool = True  # causal LM: logits at t score labels[t + 1]; an encoder-decoder's logits align with its labels
    teacher: Teacher | None = None  # spec.distillation: the KD term is mixed into the same sum (see .distill)

    def local_total(self, batches: list[Batch]) -> float:
        """This rank's share of the window: loss tokens (LM), rows or their summed class weights."""
        if not self.classification:
            return float(sum(label_tokens(b, shift=self.shift) for b in batches))
        if self.class_weights is not None:
            return float(sum(self.class_weights[b["labels"]].sum().item() for b in batches))
        return float(sum(int(b["labels"].numel()) for b in batches))

    def denominator(self, batches: list[Batch]) -> float:
        """What this rank's summed losses are divided by: the window's total over all ranks / world size.

        A collective: every rank calls it once per window, in step.
        """
        total = distributed.all_reduce_sum(self.local_total(batches))
        return (total or 1.0) / distributed.world_size()

    def __call__(self, model: Callable[..., Any], batch: Batch, denominator: float) -> torch.Tensor:
        """This micro-batch's share of the window's mean loss (a forward pass of ``model``)."""
        labels = batch["labels"]
        inputs: dict[str, Any] = {k: v for k, v in batch.items() if k != "labels"}
        if not self.classification:
            # No KV cache: with one, transformers skips the packed-row detection that keeps attention per row.
            inputs["use_cache"] = False
        logits = model(**inputs).logits.float()
        if self.classification:
            loss_sum = F.cross_entropy(logits, labels, weight=self.class_weights, reduction="sum")
        else:
            shifted = (labels[..., 1:] if self.shift else labels).reshape(-1)
            flat = (logits[..., :-1, :] if self.shift else logits).reshape(-1, logits.shape[-1])
            loss_sum = F.cross_entropy(flat, shifted, ignore_index=IGNORE_INDEX, reduction="sum")
        if self.teacher is not None:
            loss_sum = self.teacher.mix(loss_sum, logits, inputs, labels, classification=self.classification, class_weights=self.class_weights)
        return loss_sum / denominator
