"""Stage 6: carve validation and test sets out of train when they are not given as files.

The split is a seeded :func:`sklearn.model_selection.train_test_split` on row indices, test first, then
validation from the rest (so ``split.validation`` and ``split.test`` are both fractions of the whole).
For classification with ``split.stratify`` every split keeps the class proportions; when a class is too
rare for that (fewer than 2 rows, or fewer rows in a split than classes) the split falls back to a
plain random one and the report says why. Indices are returned sorted: each split keeps the file
order, and shuffling is the training loop's job (seeded per epoch).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from sklearn.model_selection import train_test_split


@dataclass
class SplitPlan:
    train: np.ndarray
    validation: np.ndarray | None
    test: np.ndarray | None
    info: dict = field(default_factory=dict)


def split_indices(
    n: int,
    *,
    validation: float,
    test: float,
    seed: int,
    stratify_labels: list[int] | np.ndarray | None = None,
) -> SplitPlan:
    """Row indices for train/validation/test; a fraction of 0 gives None for that split."""
    indices = np.arange(n)
    labels = np.asarray(stratify_labels) if stratify_labels is not None else None
    info: dict = {"method": "ratio", "seed": seed, "validation_fraction": validation, "test_fraction": test}
    stratified = labels is not None

    def cut(idx: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
        nonlocal stratified
        if stratified:
            try:
                a, b = train_test_split(idx, test_size=fraction, random_state=seed, stratify=labels[idx])
                return a, b
            except ValueError as exc:  # a class too small to spread over the splits
                stratified = False
                info["stratify_fallback"] = str(exc)
        return tuple(train_test_split(idx, test_size=fraction, random_state=seed))  # type: ignore[return-value]

    test_idx = val_idx = None
    rest = indices
    if test > 0:
        rest, test_idx = cut(rest, test)
    if validation > 0:
        rest, val_idx = cut(rest, validation / (1.0 - test))
    info["stratified"] = bool(stratified and labels is not None)
    return SplitPlan(
        train=np.sort(rest),
        validation=np.sort(val_idx) if val_idx is not None else None,
        test=np.sort(test_idx) if test_idx is not None else None,
        info=info,
    )
