"""A stand-in for ``finetune_trainer.data.prepare_data`` while the data package is not importable.

It follows the data contract (PreparedData fields, column names, determinism) in the simplest way:
JSONL only, no cleaning, a seeded split. ``install()`` uses the real module whenever it exists, so the
trainer tests exercise the real data pipeline as soon as it lands.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import Any


@dataclass
class FakePreparedData:
    train: Any
    validation: Any
    test: Any
    retention: Any = None
    labels: list[str] | None = None
    class_weights: list[float] | None = None
    report: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> Any:
        from finetune_api.status import DataSummary

        r = self.report
        return DataSummary(rows_read=r["rows_read"], rows_kept=r["rows_kept"], rows_removed=0, malformed=0,
                           exact_duplicates=0, near_duplicates=0, pii_redacted=0, leakage=0)


def _read_jsonl(storage: Any, uri: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in storage.read_bytes(uri).decode().splitlines() if line.strip()]


def fake_prepare_data(spec: Any, storage: Any, tokenizer: Any, *, cache_dir: Any = None) -> FakePreparedData:
    from datasets import Dataset

    ds = spec.dataset
    rows = _read_jsonl(storage, ds.train)
    order = list(range(len(rows)))
    random.Random(ds.split.seed).shuffle(order)
    n_val, n_test = int(len(rows) * ds.split.validation), int(len(rows) * ds.split.test)
    parts = {"validation": order[:n_val], "test": order[n_val:n_val + n_test], "train": order[n_val + n_test:]}
    max_len = spec.hyperparameters.max_seq_length
    labels = None
    if ds.format == "classification":
        labels = list(spec.model.labels or sorted({str(r[ds.fields.label]) for r in rows}))

    def encode(idx: list[int]) -> Any:
        out: dict[str, list] = {"input_ids": [], "label" if labels else "labels": []}
        for i in idx:
            r = rows[i]
            if labels:
                out["input_ids"].append(tokenizer(r[ds.fields.text], truncation=True, max_length=max_len)["input_ids"])
                out["label"].append(labels.index(str(r[ds.fields.label])))
            else:
                p = tokenizer(r[ds.fields.prompt], add_special_tokens=True)["input_ids"]
                c = tokenizer(r[ds.fields.completion], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                out["input_ids"].append((p + c)[:max_len])
                out["labels"].append(([-100] * len(p) + c)[:max_len])
        return Dataset.from_dict(out)

    report = {"rows_read": len(rows), "rows_kept": len(rows), "splits": {k: len(v) for k, v in parts.items()}}
    return FakePreparedData(train=encode(parts["train"]), validation=encode(parts["validation"]), test=encode(parts["test"]),
                            labels=labels, report=report)


def install() -> bool:
    """Put the fake in place if the real prepare_data cannot be imported. Returns True when faked."""
    try:
        from finetune_trainer.data import prepare_data  # noqa: F401

        return False
    except ImportError:
        import finetune_trainer.data as data

        data.prepare_data = fake_prepare_data
        data.format_report = lambda report: json.dumps(report)
        return True
