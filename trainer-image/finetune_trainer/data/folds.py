"""Stage 6b: the folds of ``dataset.crossValidation``, cut from the training rows once the test split is out.

The test split is held out first (as without cross-validation), so no test row is in any fold, and the
test-in-train leakage check has already run against every fold's rows. The remaining rows are cut into K
folds by scikit-learn's seeded :class:`~sklearn.model_selection.StratifiedKFold` (classification with
``stratify``; a class too rare for K folds falls back to :class:`~sklearn.model_selection.KFold` and the
report says why) or ``KFold``. Fold *k* validates on its rows and trains on the others.

The leakage rule holds per fold: a validation row of fold *k* that equals or nearly equals (the same key and
threshold as :mod:`.leakage`) a row of fold *k*'s training folds fails the job, is dropped from that fold's
validation, or is reported, as ``dataset.leakageCheck`` says. Dedupe removes most of them already; what
is left are near-duplicates when near dedupe is off (or exact ones when exact dedupe is off).

Folds are lists of row indices into the final train dataset (which keeps the staged row order), so the
trainer views them with ``Dataset.select`` and nothing is written twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
from sklearn.model_selection import KFold, StratifiedKFold

from finetune_trainer.data.leakage import build_index, find_leakage
from finetune_trainer.errors import EmptyDataset, LeakageDetected


@dataclass(frozen=True)
class Fold:
    """Row indices (into the final train dataset, sorted) of one fold's training and validation rows."""

    train: list[int]
    validation: list[int]

    def wire(self) -> dict[str, list[int]]:
        return {"train": self.train, "validation": self.validation}

    @classmethod
    def from_wire(cls, d: dict[str, list[int]]) -> "Fold":
        return cls(train=list(d["train"]), validation=list(d["validation"]))


def fold_indices(n: int, folds: int, *, seed: int, stratify_labels: np.ndarray | None = None) -> tuple[list[tuple[np.ndarray, np.ndarray]], str | None]:
    """K (train, validation) index pairs over ``range(n)``, each sorted; and why stratification fell back (or None).

    Every row is in exactly one validation fold. The same ``n``, labels and seed give the same folds.
    """
    if n < folds:
        raise EmptyDataset(f"{n} training rows are too few for dataset.crossValidation.folds {folds} (each fold needs a row). "
                           "Add data or lower crossValidation.folds.")
    rows = np.arange(n)
    fallback = None
    if stratify_labels is not None:
        _, counts = np.unique(stratify_labels, return_counts=True)
        if counts.min() >= folds:
            splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
            return [(np.sort(t), np.sort(v)) for t, v in splitter.split(rows, stratify_labels)], None
        fallback = f"the rarest class has {int(counts.min())} rows, fewer than {folds} folds: plain KFold"
    splitter_plain = KFold(n_splits=folds, shuffle=True, random_state=seed)
    return [(np.sort(t), np.sort(v)) for t, v in splitter_plain.split(rows)], fallback


def plan_folds(staged_train: datasets.Dataset, *, folds: int, seed: int, stratify_labels: np.ndarray | None, policy: str,
               near_threshold: float) -> tuple[list[Fold], dict[str, Any]]:
    """The folds of ``staged_train`` (staged columns: ``_hash``, ``_sig``, ...) with the leakage rule applied per fold,
    and the data report's ``cross_validation`` section."""
    pairs, fallback = fold_indices(len(staged_train), folds, seed=seed, stratify_labels=stratify_labels)
    planned: list[Fold] = []
    reports: list[dict[str, Any]] = []
    leaked_total = 0
    for k, (train_idx, val_idx) in enumerate(pairs, start=1):
        fold_report: dict[str, Any] = {"fold": k, "train_rows": len(train_idx)}
        if policy != "off":
            training = staged_train.select(train_idx)
            found = find_leakage(build_index(training, near_threshold), staged_train.select(val_idx), training, f"fold {k} validation",
                                 f"fold {k} train")
            fold_report["leakage"] = found.as_report()
            leaked_total += found.total
            if found.total and policy == "fail":
                first = found.examples[0]
                raise LeakageDetected(
                    f"{found.total} validation rows of cross-validation fold {k} also appear in its training folds ({found.exact} exact, "
                    f"{found.near} near); e.g. {first['row']} matches {first['matched_row']} ({first['match']}). Remove the near-duplicates "
                    "(dataset.preprocessing.dedupe.near: true), or set dataset.leakageCheck to drop (remove them from the fold's validation) or warn."
                )
            if found.total and policy == "drop":
                val_idx = np.delete(val_idx, found.leaked_rows)
                fold_report["leakage"]["dropped"] = len(found.leaked_rows)
                if len(val_idx) == 0:
                    raise EmptyDataset(f"cross-validation fold {k} has no validation rows left after dropping those found in its training folds "
                                       "(leakageCheck drop). Add data, lower crossValidation.folds, or turn on near dedupe.")
        fold_report["validation_rows"] = len(val_idx)
        reports.append(fold_report)
        planned.append(Fold(train=train_idx.tolist(), validation=val_idx.tolist()))
    report = {"folds": folds, "seed": seed, "stratified": stratify_labels is not None and fallback is None, "rows": len(staged_train),
              "fold_reports": reports, "leakage_total": leaked_total}
    if fallback:
        report["stratify_fallback"] = fallback
    return planned, report
