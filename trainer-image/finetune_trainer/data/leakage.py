"""Stage 7: train/eval leakage -- validation or test examples that also appear in train.

An evaluation row leaks when its dedupe key (see :mod:`.cleaning`) equals a train row's, or when the two
are near-duplicates at ``preprocessing.dedupe.nearThreshold`` (checked even when near dedupe is off).
A leaked row inflates the metric, because the model has trained on the answer. ``dataset.leakageCheck``:
``fail`` raises LeakageDetected with the counts, ``warn`` keeps the rows and reports them, ``drop``
removes them from validation/test, ``off`` skips the check.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from finetune_trainer.data.cleaning import DuplicateIndex

MAX_EXAMPLES = 5
BATCH = 1000


@dataclass
class LeakageFindings:
    exact: int = 0
    near: int = 0
    leaked_rows: list[int] = field(default_factory=list)  # row indices in the evaluation split
    examples: list[dict[str, Any]] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.exact + self.near

    def as_report(self) -> dict[str, Any]:
        return {"exact": self.exact, "near": self.near, "total": self.total, "examples": self.examples}


def build_train_index(train: Any, near_threshold: float) -> DuplicateIndex:
    """A DuplicateIndex over the train split's stored key hashes and signatures (row id = train row)."""
    index = DuplicateIndex(near_threshold, near=True)
    for table in train.select_columns(["_hash", "_sig"]).with_format("arrow").iter(batch_size=BATCH):
        signatures = _signature_matrix(table["_sig"])
        for hash_, sig in zip(table["_hash"].to_pylist(), signatures):
            index.add(hash_, sig)
    return index


def _signature_matrix(column: Any) -> np.ndarray:
    """A list<uint32> Arrow column of equal-length signatures as one (rows, NUM_PERM) array."""
    values = column.combine_chunks().flatten().to_numpy()
    return values.reshape(len(column), -1).astype(np.uint32, copy=False)


def find_leakage(index: DuplicateIndex, evaluation: Any, train: Any, split_name: str) -> LeakageFindings:
    """Rows of ``evaluation`` that equal or nearly equal a train row."""
    found = LeakageFindings()
    row = 0
    for table in evaluation.select_columns(["_hash", "_sig", "_origin", "_preview"]).with_format("arrow").iter(batch_size=BATCH):
        signatures = _signature_matrix(table["_sig"])
        columns = (table[c].to_pylist() for c in ("_hash", "_origin", "_preview"))
        for (hash_, origin, preview), sig in zip(zip(*columns), signatures):
            match = index.exact_match(hash_)
            kind = "exact"
            if match is None:
                match = index.near_match(sig)
                kind = "near"
            if match is not None:
                if kind == "exact":
                    found.exact += 1
                else:
                    found.near += 1
                found.leaked_rows.append(row)
                if len(found.examples) < MAX_EXAMPLES:
                    found.examples.append(
                        {
                            "split": split_name,
                            "match": kind,
                            "row": origin,
                            "train_row": train[int(match)]["_origin"],
                            "text": preview,
                        }
                    )
            row += 1
    return found
