"""FineTuneJob status and the trainer's progress document.

The trainer writes :class:`ProgressDocument` to ``<output>/progress.json``; the operator reads it and
projects it into :class:`FineTuneJobStatus`. Both shapes live here so the contract has one definition.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore", use_enum_values=True)

    def wire(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class Phase(str, Enum):
    pending = "Pending"
    running = "Running"
    restarting = "Restarting"
    succeeded = "Succeeded"
    failed = "Failed"
    suspended = "Suspended"


TERMINAL_PHASES = (Phase.succeeded.value, Phase.failed.value)


class ConditionType(str, Enum):
    """The condition types the operator sets: one per phase that has one (Pending has none). The
    condition named like the current phase is True; the others that were ever True are False."""

    running = "Running"
    restarting = "Restarting"
    suspended = "Suspended"
    succeeded = "Succeeded"
    failed = "Failed"


class Condition(_Model):
    """A Kubernetes-style condition."""

    type: str = Field(
        max_length=316,
        description=f"Condition type: {', '.join(t.value for t in ConditionType)}. The one named like the current phase is True (Pending has none).",
    )
    status: str = Field(description="True, False or Unknown.", json_schema_extra={"enum": ["True", "False", "Unknown"]})
    reason: str = Field(max_length=1024, description="CamelCase reason for the last transition.")
    message: str = Field(max_length=32768, description="Human-readable details; says what to fix on failure.")
    last_transition_time: str = Field(description="When the status last changed.", json_schema_extra={"format": "date-time"})
    observed_generation: int | None = Field(default=None, description="Spec generation the condition was set for.")


class CheckpointRef(_Model):
    step: int = Field(description="Optimizer step of the checkpoint.")
    uri: str = Field(description="Where the checkpoint is.")
    metric: float | None = Field(default=None, description="Monitored eval metric at that step.")


class Progress(_Model):
    """Training progress, copied from the trainer's progress document."""

    step: int | None = Field(default=None, description="Optimizer steps done.")
    total_steps: int | None = Field(default=None, description="Optimizer steps planned.")
    percent: float | None = Field(default=None, description="step / totalSteps in percent.")
    text: str | None = Field(default=None, description="step/total (percent), as shown by kubectl get.")
    epoch: float | None = Field(default=None, description="Fractional epoch.")
    eta_seconds: float | None = Field(default=None, description="Estimated seconds to finish training.")
    train_loss: float | None = Field(default=None, description="Latest training loss.")
    eval_loss: float | None = Field(default=None, description="Latest validation loss.")
    learning_rate: float | None = Field(default=None, description="Current learning rate.")
    best_metric: float | None = Field(default=None, description="Best value of the monitored metric so far.")
    best_metric_name: str | None = Field(default=None, description="Name of the monitored metric.")
    stage: str | None = Field(default=None, description="What the trainer is doing: preparing-data, baseline, training, testing, saving, done.")
    updated_at: str | None = Field(default=None, description="When the trainer last wrote progress.")


class DataSummary(_Model):
    """Summary of the data report."""

    rows_read: int | None = Field(default=None, description="Rows read from all inputs.")
    rows_kept: int | None = Field(default=None, description="Rows used for training after cleaning.")
    rows_removed: int | None = Field(default=None, description="Rows removed by cleaning.")
    malformed: int | None = Field(default=None, description="Rows that could not be parsed.")
    exact_duplicates: int | None = Field(default=None, description="Exact duplicates removed.")
    near_duplicates: int | None = Field(default=None, description="Near-duplicates removed.")
    pii_redacted: int | None = Field(default=None, description="PII spans replaced by placeholders.")
    leakage: int | None = Field(default=None, description="Validation/test examples also found in train.")
    report_uri: str | None = Field(default=None, description="Full data report.")


class Gain(_Model):
    metric: str | None = Field(default=None, description="Metric compared.")
    baseline: float | None = Field(default=None, description="Base model before fine-tuning.")
    final: float | None = Field(default=None, description="Fine-tuned model on the same set.")


class FineTuneJobStatus(_Model):
    """Observed state, written by the operator only."""

    phase: str | None = Field(
        default=None,
        description="Pending, Running, Restarting, Succeeded, Failed or Suspended.",
        json_schema_extra={"enum": [p.value for p in Phase]},
    )
    reason: str | None = Field(default=None, description="Reason of the last phase change.")
    message: str | None = Field(default=None, description="Human-readable explanation of the phase.")
    observed_generation: int | None = Field(default=None, description="metadata.generation the operator last acted on.")
    conditions: list[Condition] | None = Field(default=None, description="Latest observations of the job's state.")
    start_time: str | None = Field(default=None, description="When the training workload was first created.", json_schema_extra={"format": "date-time"})
    completion_time: str | None = Field(default=None, description="When the job finished.", json_schema_extra={"format": "date-time"})
    restarts: int | None = Field(default=None, description="Times the training group was recreated after a failure.")
    job_name: str | None = Field(default=None, description="The batch/v1 Job running the current attempt.")
    attempt: int | None = Field(default=None, description="Current attempt number, starting at 0.")
    progress: Progress | None = Field(default=None, description="Training progress reported by the trainer.")
    latest_checkpoint: str | None = Field(default=None, description="URI of the newest complete checkpoint.")
    checkpoints: list[CheckpointRef] | None = Field(default=None, description="The most recent complete checkpoints.")
    model_uri: str | None = Field(default=None, description="Where the final model was written.")
    data: DataSummary | None = Field(default=None, description="Data report summary.")
    gain: Gain | None = Field(default=None, description="Baseline versus final metric.")
    failure_reason: str | None = Field(default=None, description="The trainer's one-line reason for the last failure.")


class ProgressDocument(_Model):
    """What the trainer writes to <output>/progress.json (rank 0 only)."""

    model_config = ConfigDict(extra="allow")

    stage: str = "starting"
    step: int = 0
    total_steps: int | None = None
    epoch: float = 0.0
    eta_seconds: float | None = None
    train_loss: float | None = None
    eval_loss: float | None = None
    learning_rate: float | None = None
    best_metric: float | None = None
    best_metric_name: str | None = None
    latest_checkpoint: str | None = None
    checkpoints: list[CheckpointRef] = Field(default_factory=list)
    model_uri: str | None = None
    data: DataSummary | None = None
    gain: Gain | None = None
    updated_at: str | None = None
