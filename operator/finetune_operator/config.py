"""Operator settings, read once from the environment (set by the Helm chart)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from finetune_operator.builders import OperatorDefaults


def _int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise SystemExit(f"environment variable {name} must be an integer, got {raw!r}") from exc


@dataclass(frozen=True)
class OperatorConfig:
    namespaces: tuple[str, ...] = ()  # empty = all namespaces
    metrics_port: int = 8080
    resync_seconds: int = 10
    log_level: str = "INFO"
    defaults: OperatorDefaults = field(default_factory=OperatorDefaults)

    @classmethod
    def from_env(cls) -> "OperatorConfig":
        namespaces = tuple(n.strip() for n in os.environ.get("FINETUNE_NAMESPACES", "").split(",") if n.strip())
        defaults = OperatorDefaults(
            trainer_image=os.environ.get("FINETUNE_TRAINER_IMAGE", OperatorDefaults.trainer_image),
            image_pull_policy=os.environ.get("FINETUNE_TRAINER_PULL_POLICY", OperatorDefaults.image_pull_policy),
            termination_grace_seconds=_int("FINETUNE_TERMINATION_GRACE_SECONDS", OperatorDefaults.termination_grace_seconds),
        )
        return cls(
            namespaces=namespaces,
            metrics_port=_int("FINETUNE_METRICS_PORT", 8080),
            resync_seconds=max(1, _int("FINETUNE_RESYNC_SECONDS", 10)),
            log_level=os.environ.get("FINETUNE_LOG_LEVEL", "INFO").upper(),
            defaults=defaults,
        )
