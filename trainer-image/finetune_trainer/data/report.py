"""The data report: what every step did to every input, as JSON (data-report.json) and as a log summary.

Each input (train, validation, test, retention) gets a :class:`StepCounts`. A row is counted once, at the
first step that drops it, so for every input::

    rows_read = malformed + empty + label_conflicts + exact_duplicates + near_duplicates
                + too_short + too_long + no_trainable_tokens + rows_kept

Examples (malformed rows, label conflicts, duplicate pairs) show at most :data:`PREVIEW_CHARS` of a row's text after
cleaning, so PII is already redacted in them when ``preprocessing.redactPii`` is on.

``total`` sums the job's own inputs (train, validation, test files); retention data is reported on its own.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from finetune_api.documents import DataSummary

MAX_EXAMPLES = 5
PREVIEW_CHARS = 200

DROP_STEPS = (
    "malformed",
    "empty",
    "label_conflicts",
    "exact_duplicates",
    "near_duplicates",
    "too_short",
    "too_long",
    "no_trainable_tokens",
)


@dataclass
class StepCounts:
    uri: str
    files: int = 0
    rows_read: int = 0
    malformed: int = 0
    empty: int = 0
    label_conflicts: int = 0
    exact_duplicates: int = 0
    near_duplicates: int = 0
    too_short: int = 0
    too_long: int = 0
    no_trainable_tokens: int = 0
    rows_kept: int = 0
    truncated: int = 0
    tokens: int = 0
    trainable_tokens: int = 0
    pii: Counter[str] = field(default_factory=Counter)
    malformed_examples: list[dict[str, str]] = field(default_factory=list)
    label_conflict_examples: list[dict[str, Any]] = field(default_factory=list)
    duplicate_examples: list[dict[str, Any]] = field(default_factory=list)  # up to MAX_EXAMPLES exact and near pairs

    def add_malformed(self, origin: str, reason: str, raw: str) -> None:
        self.malformed += 1
        if len(self.malformed_examples) < MAX_EXAMPLES:
            self.malformed_examples.append({"row": origin, "reason": reason, "raw": raw[:PREVIEW_CHARS]})

    def add_label_conflict(self, origin: str, labels: list[str], preview: str) -> None:
        """A row dropped because its text carries ``labels[0]`` elsewhere and ``labels[1]`` here."""
        self.label_conflicts += 1
        if len(self.label_conflict_examples) < MAX_EXAMPLES:
            self.label_conflict_examples.append({"row": origin, "labels": labels, "text": preview[:PREVIEW_CHARS]})

    def as_dict(self) -> dict[str, Any]:
        lists = ("pii", "malformed_examples", "label_conflict_examples", "duplicate_examples")
        out: dict[str, Any] = {k: v for k, v in self.__dict__.items() if k not in lists}
        out["pii"] = dict(sorted(self.pii.items()))
        out["pii_total"] = sum(self.pii.values())
        out["malformed_examples"] = list(self.malformed_examples)
        out["label_conflict_examples"] = list(self.label_conflict_examples)
        out["duplicate_examples"] = list(self.duplicate_examples)
        return out


def totals(inputs: list[dict[str, Any]]) -> dict[str, Any]:
    """Sum of the per-input counters."""
    keys = ("rows_read", *DROP_STEPS, "rows_kept", "truncated", "tokens", "trainable_tokens", "pii_total")
    out: dict[str, Any] = {k: sum(i[k] for i in inputs) for k in keys}
    pii: Counter[str] = Counter()
    for i in inputs:
        pii.update(i["pii"])
    out["pii"] = dict(sorted(pii.items()))
    return out


def summary(report: dict[str, Any], report_uri: str | None = None) -> DataSummary:
    total = report["total"]
    final = report["final_sizes"]
    kept_everywhere = sum(final.get(s) or 0 for s in ("train", "validation", "test"))
    return DataSummary(
        rows_read=total["rows_read"],
        rows_kept=final["train"],
        rows_removed=total["rows_read"] - kept_everywhere,
        malformed=total["malformed"],
        label_conflicts=total.get("label_conflicts", 0),
        exact_duplicates=total["exact_duplicates"],
        near_duplicates=total["near_duplicates"],
        pii_redacted=total["pii_total"],
        leakage=report["leakage"].get("total", 0),
        report_uri=report_uri,
    )


def pii_coverage_lines(coverage: dict[str, Any] | None, indent: str = "") -> list[str]:
    """``pii looked for: ...`` and ``pii not looked for: ...`` from the report's ``pii_coverage``
    (:func:`finetune_trainer.data.pii.coverage`)."""
    if not coverage:
        return []
    found = [item["kind"] for item in coverage.get("looked_for", [])]
    regions = ", ".join(coverage.get("regions", []))
    return [
        f"{indent}pii looked for: " + (", ".join(found) + (f" (regions {regions})" if regions and found else "") if found else "nothing"),
        f"{indent}pii not looked for: " + "; ".join(coverage.get("not_looked_for", [])),
    ]


def format_report(report: dict[str, Any]) -> str:
    """A short multi-line summary of the data report for the log."""
    final = report["final_sizes"]
    total = report["total"]
    lines = [
        f"data ({report['format']}): {total['rows_read']} rows read; final sizes "
        + ", ".join(f"{name} {size}" for name, size in final.items() if size is not None)
    ]
    for name, counts in report["inputs"].items():
        steps = "  ".join(f"{step.replace('_', ' ')} {counts[step]}" for step in DROP_STEPS if counts[step])
        lines.append(
            f"  {name:<10} read {counts['rows_read']}  kept {counts['rows_kept']}"
            + (f"  dropped: {steps}" if steps else "")
            + (f"  truncated {counts['truncated']}" if counts["truncated"] else "")
        )
        for example in counts["malformed_examples"][:2]:
            lines.append(f"             malformed {example['row']}: {example['reason']}")
    if total["pii"]:
        lines.append("  pii redacted: " + ", ".join(f"{kind} {n}" for kind, n in total["pii"].items()))
    lines += pii_coverage_lines(report.get("pii_coverage"), indent="  ")
    split = report.get("split", {})
    if split.get("method") == "ratio":
        lines.append(
            f"  split: seed {split['seed']}, validation {split['validation_fraction']}, test {split['test_fraction']}"
            + (", stratified" if split.get("stratified") else "")
        )
    leakage = report.get("leakage", {})
    if leakage.get("policy") != "off":
        checks = (("validation", "validation"), ("test", "test"), ("test_vs_validation", "test in validation"), ("retention", "retention"))
        parts = [f"{label} {leakage[s]['exact']} exact / {leakage[s]['near']} near" for s, label in checks if s in leakage]
        if parts:
            lines.append(f"  leakage ({leakage['policy']}): " + ", ".join(parts))
    classes = report.get("classes")
    if classes:
        counts = classes["train"]["counts"]
        shown = ", ".join(f"{k}={v}" for k, v in list(counts.items())[:10]) + (" ..." if len(counts) > 10 else "")
        ratio = classes["train"]["imbalance_ratio"]
        lines.append(f"  classes ({len(counts)}, from {classes['source']}): {shown}; imbalance {ratio:.2f}" if ratio else f"  classes: {shown}")
        if classes.get("class_weights"):
            lines.append("  class weights: " + ", ".join(f"{w:.3f}" for w in classes["class_weights"][:10]))
    return "\n".join(lines)
