"""Calibration of classifiers: expected calibration error and temperature scaling (Guo et al., 2017,
"On Calibration of Modern Neural Networks").

Hand-written because no maintained library does it for torch logits: :func:`expected_calibration_error`,
:func:`fit_temperature` (one scalar, fitted by L-BFGS on the validation NLL) and :func:`calibrate`
(the fit and the before/after numbers on the validation set it was fitted on) and :func:`scaled_on`
(the same before/after numbers on the held-out test set, the unbiased ones the report leads with).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ECE_BINS = 15
# Temperatures outside this range mean the fit ran away (e.g. perfectly separable validation logits, where NLL keeps
# falling as T -> 0); clamping keeps the calibrated probabilities usable.
MIN_TEMPERATURE = 1e-2
MAX_TEMPERATURE = 1e2

__all__ = ["ECE_BINS", "calibrate", "expected_calibration_error", "fit_temperature", "scaled_on"]


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


def scaled_on(logits: torch.Tensor, labels: torch.Tensor, temperature: float, prefix: str) -> dict[str, float]:
    """ECE and NLL of ``logits`` before (T = 1) and after dividing them by ``temperature``, keyed
    ``<prefix>ece_before`` ... ``<prefix>nll_after``: on the test set, what temperature scaling really did
    (the validation numbers of :func:`calibrate` are measured where the temperature was fitted)."""
    logits = logits.detach().to("cpu", torch.float64)
    labels = labels.detach().to("cpu").long().reshape(-1)
    return {
        f"{prefix}ece_before": expected_calibration_error(logits.softmax(dim=1), labels),
        f"{prefix}ece_after": expected_calibration_error((logits / temperature).softmax(dim=1), labels),
        f"{prefix}nll_before": float(_nll(logits, labels)),
        f"{prefix}nll_after": float(_nll(logits, labels, temperature)),
    }
