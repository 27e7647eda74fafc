"""FineTuneJob status: what the operator writes to ``.status``.

Parts of it are projected from the trainer's progress document; that document and the pieces they
share (:class:`CheckpointRef`, :class:`DataSummary`, :class:`Gain`) live in :mod:`finetune_api.documents`
and are re-exported here.
"""

from __future__ import annotations

from enum import Enum

from pydantic import Field

# CheckpointRef, DataSummary and Gain are parts of the status; ProgressDocument is re-exported for
# the callers that imported it from here.
from finetune_api.documents import CheckpointRef, DataSummary, Gain, Lineage, ProgressDocument, RegressionResult  # noqa: F401
from finetune_api.documents import TrackingSummary
from finetune_api.documents import CrossValidationSummary
from finetune_api.documents import WireModel as _Model


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
    fold: int | None = Field(default=None, description="With dataset.crossValidation: the fold training now (1 to folds); unset during the refit.")
    updated_at: str | None = Field(default=None, description="When the trainer last wrote progress.")


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
    next_restart_time: str | None = Field(
        default=None,
        description="When the next attempt is created after a failure (exponential restart backoff); unset once it is.",
        json_schema_extra={"format": "date-time"},
    )
    progress: Progress | None = Field(default=None, description="Training progress reported by the trainer.")
    progress_problem: str | None = Field(
        default=None, max_length=4096,
        description="Why the operator could not read the trainer's progress document (progress.json) the last time it tried; unset once a read succeeds. Progress in status is then the last good reading.",
    )
    latest_checkpoint: str | None = Field(default=None, description="URI of the newest complete checkpoint.")
    checkpoints: list[CheckpointRef] | None = Field(default=None, description="The most recent complete checkpoints.")
    model_uri: str | None = Field(default=None, description="Where the final model was written.")
    data: DataSummary | None = Field(default=None, description="Data report summary.")
    gain: Gain | None = Field(default=None, description="Baseline versus final metric.")
    tracking: TrackingSummary | None = Field(default=None, description="TensorBoard folder, MLflow run and model version, and any tracker problem.")
    failure_reason: str | None = Field(default=None, description="The trainer's one-line reason for the last failure.")
    test_set_uri: str | None = Field(default=None, description="Where the trainer stored the test split, for jobs that start from this one (model.fromJob).")
    lineage: Lineage | None = Field(default=None, description="With model.fromJob: the parent job and model this job started from (set before the first pod).")
    teacher_uri: str | None = Field(
        default=None, description="With distillation.teacher.fromJob: the model that job exported, this job's teacher (set before the first pod)."
    )
    regression: RegressionResult | None = Field(
        default=None, description="With model.fromJob: the new model against its parent on the parent's test set (evaluation.regression)."
    )
    cross_validation: CrossValidationSummary | None = Field(
        default=None, description="With dataset.crossValidation: every finished fold's validation metrics and each metric's mean and standard deviation."
    )

