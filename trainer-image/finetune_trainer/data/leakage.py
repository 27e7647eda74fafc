"""Stage 7: leakage -- evaluation rows that also appear in the data they must be independent of.

Four checks, each of an *evaluated* split against a *reference* split (:data:`CHECKS`):

- ``validation`` in train and ``test`` in train: the model trained on the answer, so the metric is inflated;
- ``test_vs_validation``: test rows (not already found in train) that are in validation, which chose
  the checkpoint, so the test is not independent of that choice;
- ``retention`` in train: the forgetting check would measure data the model was trained on.

A row leaks when its leakage key (``dataset.leakageKey``, see :func:`~finetune_trainer.data.formats.key_text`,
compared in the dedupe-key form of :mod:`.cleaning`) equals a reference row's, or when the two are
near-duplicates at ``preprocessing.dedupe.nearThreshold`` (checked even when near dedupe is off).
``dataset.leakageCheck``: ``fail`` raises LeakageDetected with the counts, ``warn`` keeps the rows and
reports them, ``drop`` removes them from the evaluated split, ``off`` skips the checks. Every finding
reports up to 5 example pairs: the evaluated row and the row it matches, with their texts (redacted).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa

from finetune_trainer.data.cleaning import EXACT, NONE, DuplicateIndex, hash_words
from finetune_trainer.data.report import MAX_EXAMPLES

BATCH = 1000

CHECKS = (
    # report key, evaluated split, reference split
    ("validation", "validation", "train"),
    ("test", "test", "train"),
    ("test_vs_validation", "test", "validation"),
    ("retention", "retention", "train"),
)
TRAIN_CHECKS = ("validation", "test")  # the report's ``total`` (and the status's leakage count)
PHRASES = {"validation": "validation", "test": "test", "test_vs_validation": "test in validation", "retention": "retention"}


@dataclass
class LeakageFindings:
    exact: int = 0
    near: int = 0
    leaked_rows: list[int] = field(default_factory=list)  # row indices in the evaluated split
    examples: list[dict[str, Any]] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.exact + self.near

    def as_report(self) -> dict[str, Any]:
        return {"exact": self.exact, "near": self.near, "total": self.total, "examples": self.examples}


def build_index(reference: datasets.Dataset, near_threshold: float) -> DuplicateIndex:
    """A DuplicateIndex over a staged split's key hashes and signatures (row id = row of ``reference``)."""
    index = DuplicateIndex(near_threshold, near=True, spill_dir=_spill_dir(reference))
    for table in reference.select_columns(["_hash", "_sig"]).with_format("arrow").iter(batch_size=BATCH):
        index.add_batch(hash_words(table["_hash"].to_pylist()), _signature_matrix(table["_sig"]))
    return index


def _spill_dir(dataset: datasets.Dataset) -> str | None:
    """The folder of the dataset's Arrow file (the job's work folder), for the index's signature file."""
    files = dataset.cache_files
    return str(Path(files[0]["filename"]).parent) if files else None


def _signature_matrix(column: pa.ChunkedArray) -> np.ndarray:
    """A list<uint32> Arrow column of equal-length signatures as one (rows, NUM_PERM) array."""
    values = column.combine_chunks().flatten().to_numpy()
    return values.reshape(len(column), -1).astype(np.uint32, copy=False)


def find_leakage(
    index: DuplicateIndex,
    evaluation: datasets.Dataset,
    reference: datasets.Dataset,
    split_name: str,
    reference_name: str = "train",
    skip: frozenset[int] = frozenset(),
) -> LeakageFindings:
    """Rows of ``evaluation`` (other than ``skip``) that equal or nearly equal a row of ``reference``."""
    found = LeakageFindings()
    row = 0
    for table in evaluation.select_columns(["_hash", "_sig", "_origin", "_preview"]).with_format("arrow").iter(batch_size=BATCH):
        kind, matched, sims = index.match(hash_words(table["_hash"].to_pylist()), _signature_matrix(table["_sig"]))
        for i in np.flatnonzero(kind != NONE).tolist():
            if row + i in skip:
                continue
            match = int(matched[i])
            if kind[i] == EXACT:
                found.exact += 1
            else:
                found.near += 1
            found.leaked_rows.append(row + i)
            if len(found.examples) < MAX_EXAMPLES:
                matched_row = reference[match]
                found.examples.append({
                    "split": split_name, "match": "exact" if kind[i] == EXACT else "near", "row": table["_origin"][i].as_py(),
                    "text": table["_preview"][i].as_py(), "matched_split": reference_name, "matched_row": matched_row["_origin"],
                    "matched_text": matched_row["_preview"], "similarity": round(float(sims[i]), 4),
                })
        row += table.num_rows
    return found


def run_checks(splits: dict[str, datasets.Dataset | None], near_threshold: float) -> dict[str, LeakageFindings]:
    """Every check of :data:`CHECKS` whose two splits exist, by report key."""
    indexes: dict[str, DuplicateIndex] = {}
    findings: dict[str, LeakageFindings] = {}
    for name, evaluated, reference in CHECKS:
        evaluation, ref = splits.get(evaluated), splits.get(reference)
        if evaluation is None or ref is None:
            continue
        if reference not in indexes:
            indexes[reference] = build_index(ref, near_threshold)
        skip = frozenset(findings["test"].leaked_rows) if name == "test_vs_validation" and "test" in findings else frozenset()
        findings[name] = find_leakage(indexes[reference], evaluation, ref, evaluated, reference, skip)
    return findings


def failure_message(findings: dict[str, LeakageFindings]) -> str:
    """The LeakageDetected message: the counts per check and the first example."""
    found = {n: f for n, f in findings.items() if f.total}
    total = sum(f.total for f in found.values())
    counts = ", ".join(f"{PHRASES[n]}: {f.exact} exact, {f.near} near" for n, f in found.items())
    first = next(e for f in found.values() for e in f.examples)
    what = "validation/test examples also appear in train" if set(found) <= set(TRAIN_CHECKS) else "evaluation examples also appear in train or validation"
    return (
        f"{total} {what} ({counts}); e.g. {first['row']} matches {first['matched_split']} row {first['matched_row']} "
        f"({first['match']}). Remove them from the data, or set dataset.leakageCheck to drop (remove them from "
        "validation/test/retention) or warn."
    )
