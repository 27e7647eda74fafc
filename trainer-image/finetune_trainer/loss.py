"""The loss of one micro-batch, normalised over its whole accumulation window.

A window of ``gradientAccumulationSteps`` micro-batches is one optimizer step. Each micro-batch's loss is
a *sum* over its loss tokens (causal LM: every token whose label is not ``IGNORE_INDEX``; classification:
every row, weighted by its class weight when ``preprocessing.classWeights`` is on), divided by the
window's total (:meth:`WindowLoss.denominator`). Summed over the window that is the mean token loss of
the window, so every token weighs the same however the rows fall into micro-batches.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .collate import IGNORE_INDEX, label_tokens

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class WindowLoss:
    classification: bool
    class_weights: torch.Tensor | None = None  # classification only, on the training device

    def denominator(self, batches: list[Batch]) -> float:
        """What the window's summed losses are divided by: loss tokens (LM), rows or their summed class weights."""
        if not self.classification:
            return float(max(1, sum(label_tokens(b) for b in batches)))
        if self.class_weights is not None:
            return float(sum(self.class_weights[b["labels"]].sum().item() for b in batches)) or 1.0
        return float(sum(int(b["labels"].numel()) for b in batches))

    def __call__(self, model: Callable[..., Any], batch: Batch, denominator: float) -> torch.Tensor:
        """This micro-batch's share of the window's mean loss (a forward pass of ``model``)."""
        labels = batch["labels"]
        inputs: dict[str, Any] = {k: v for k, v in batch.items() if k != "labels"}
        if not self.classification:
            # No KV cache: with one, transformers skips the packed-row detection that keeps attention per row.
            inputs["use_cache"] = False
        logits = model(**inputs).logits.float()
        if self.classification:
            return F.cross_entropy(logits, labels, weight=self.class_weights, reduction="sum") / denominator
        shifted = labels[..., 1:].reshape(-1)
        flat = logits[..., :-1, :].reshape(-1, logits.shape[-1])
        return F.cross_entropy(flat, shifted, ignore_index=IGNORE_INDEX, reduction="sum") / denominator
