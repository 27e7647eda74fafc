"""Classification labels: the label set, unknown labels, class balance and class weights.

The label set is ``model.labels`` when given (in that order: it is the model's label-id order), else the
sorted unique labels of the training data -- numerically sorted when every label is an integer, so
``2`` comes before ``10``. A row whose label is outside the set fails the job with ``UnknownLabel``.
"""

from __future__ import annotations

from collections import Counter

from finetune_trainer.errors import InvalidConfig, UnknownLabel


def sort_labels(names: set[str] | list[str]) -> list[str]:
    names = set(names)
    try:
        return sorted(names, key=int)
    except ValueError:
        return sorted(names)


def check_label(label: str, known: list[str] | set[str], origin: str, where: str) -> None:
    """Raise UnknownLabel when ``label`` is not in ``known``."""
    if label not in known:
        shown = ", ".join(sorted(known)[:20]) + (", ..." if len(known) > 20 else "")
        raise UnknownLabel(
            f"label {label!r} in row {origin} is not one of the labels {where}: [{shown}]. "
            "Fix the row, or add the label to model.labels."
        )


def resolve_labels(spec_labels: list[str] | None, num_labels: int | None, train_labels: set[str]) -> tuple[list[str], str]:
    """The label names in id order and where they came from (``spec`` or ``data``)."""
    if spec_labels:
        return list(spec_labels), "spec"
    labels = sort_labels(train_labels)
    if num_labels is not None and len(labels) != num_labels:
        raise InvalidConfig(
            f"model.numLabels is {num_labels} but the training data has {len(labels)} labels "
            f"({', '.join(labels[:20])}). Set model.labels to name every class in label-id order."
        )
    if len(labels) < 2:
        raise InvalidConfig(
            f"classification needs at least 2 classes; the training data has {len(labels)} ({', '.join(labels)})."
        )
    return labels, "data"


def class_balance(counts: Counter[str], labels: list[str]) -> dict:
    """Per-class counts in label order, the imbalance ratio (largest / smallest non-empty class) and empty classes."""
    per_class = {name: int(counts.get(name, 0)) for name in labels}
    present = [c for c in per_class.values() if c > 0]
    return {
        "counts": per_class,
        "imbalance_ratio": (max(present) / min(present)) if present else None,
        "classes_without_rows": [name for name, c in per_class.items() if c == 0],
    }


def inverse_frequency_weights(counts: Counter[str], labels: list[str]) -> list[float]:
    """``n_rows / (n_classes * n_rows_of_class)`` per class (scikit-learn's "balanced" weights).

    A class with no training rows gets 1.0: it contributes no training loss either way, and 1.0 keeps
    evaluation losses on it unscaled.
    """
    total = sum(counts.get(name, 0) for name in labels)
    present = sum(1 for name in labels if counts.get(name, 0) > 0)
    return [total / (present * counts[name]) if counts.get(name, 0) > 0 else 1.0 for name in labels]
