"""The ``FINETUNE_*`` environment variables the operator sets on training pods and the trainer reads.

The operator's pod builder writes them (``finetune_operator.builders``); the trainer reads them, with
a default for runs outside Kubernetes (a laptop, the tests). A name used on one side only is a bug
that no test of either side alone would catch, so both take the names from here.
"""

from __future__ import annotations

JOB_NAME = "FINETUNE_JOB_NAME"
"""The FineTuneJob's name. For logs and users' own scripts; the trainer takes the name from the job config."""

NAMESPACE = "FINETUNE_NAMESPACE"
"""The FineTuneJob's namespace, for the same readers as :data:`JOB_NAME`."""

ATTEMPT = "FINETUNE_ATTEMPT"
"""Which attempt (0, 1, ...) of the job this pod belongs to: the operator recreates the group on a retry."""

METRICS_PORT = "FINETUNE_METRICS_PORT"
"""Base port of the trainer's Prometheus metrics: local rank i serves on base + i; 0 turns them off."""

TERMINATION_LOG = "FINETUNE_TERMINATION_LOG"
"""File the trainer writes its ``Reason: message`` line to: the container's terminationMessagePath."""

CACHE_DIR = "FINETUNE_CACHE_DIR"
"""Node-local cache (downloaded base models), an emptyDir in the pod."""

WORK_DIR = "FINETUNE_WORK_DIR"
"""Scratch space for prepared data and checkpoints before upload, an emptyDir in the pod."""

LOG_LEVEL = "FINETUNE_LOG_LEVEL"
"""Trainer log level (default INFO). Not set by the operator; a user may set it in spec.resources.env."""

DEFAULT_TERMINATION_LOG = "/dev/termination-log"
"""Kubernetes' default terminationMessagePath, and the trainer's default for :data:`TERMINATION_LOG`."""

JOB_UID = "FINETUNE_JOB_UID"
"""The FineTuneJob's metadata.uid: the trainer claims spec.output.uri with it (a marker object) so that
a second job writing to the same output fails (OutputClaimed) instead of deleting or resuming the
first one's checkpoints. Unset outside Kubernetes: no claim is made."""

MLFLOW_PARENT_RUN_ID = "FINETUNE_MLFLOW_PARENT_RUN_ID"
"""An MLflow run the job's run is nested under (tag ``mlflow.parentRunId``): the parent run of a sweep,
explicitly. Not set by the operator: a sweep's trials get :data:`SWEEP_NAME`, :data:`SWEEP_UID` and
:data:`SWEEP_TRIAL` instead, and the trainer finds or creates the sweep's parent run itself (the operator
never talks to MLflow). Unset, and no sweep: a top-level run."""

SWEEP_NAME = "FINETUNE_SWEEP_NAME"
"""Set on a sweep's trials only (label finetune.io/sweep and a controller ownerReference of kind
FineTuneSweep): the sweep's name, the MLflow parent run's name."""

SWEEP_UID = "FINETUNE_SWEEP_UID"
"""The trial's FineTuneSweep's metadata.uid (its ownerReference's): the trainer tags the sweep's MLflow
parent run ``finetune.sweepKey`` with a hash of it, so all trials find the same parent run."""

SWEEP_TRIAL = "FINETUNE_SWEEP_TRIAL"
"""The trial's number (label finetune.io/sweep-trial): the step of its result in the parent run."""

SWEEP = (SWEEP_NAME, SWEEP_UID, SWEEP_TRIAL)
"""What a sweep's trial gets besides :data:`SET_BY_OPERATOR`; reserved like :data:`LINEAGE`."""

PARENT_JOB = "FINETUNE_PARENT_JOB"
"""spec.model.fromJob.name, once the operator resolved it (the parent Succeeded): set only for such jobs."""

PARENT_MODEL_URI = "FINETUNE_PARENT_MODEL_URI"
"""The parent's exported model (its status.modelUri, or the merged copy under it): a full model folder, or an adapter."""

PARENT_BASE_MODEL_URI = "FINETUNE_PARENT_BASE_MODEL_URI"
"""Set when :data:`PARENT_MODEL_URI` is an adapter: the model folder the adapter chain sits on."""

PARENT_ADAPTERS = "FINETUNE_PARENT_ADAPTERS"
"""JSON list of adapter folders, oldest first, to merge into :data:`PARENT_BASE_MODEL_URI` (the last is the parent's)."""

PARENT_OUTPUT_URI = "FINETUNE_PARENT_OUTPUT_URI"
"""The parent's spec.output.uri: its progress.json there holds its recorded test metrics."""

PARENT_DATA_REPORT_DIGEST = "FINETUNE_PARENT_DATA_REPORT_DIGEST"
"""sha256 of the parent's data-report.json as the parent wrote it (its status.data.reportDigest)."""

PARENT_TEST_SET_URI = "FINETUNE_PARENT_TEST_SET_URI"
"""The parent's stored test split (its status.testSetUri), which the regression gate evaluates the new model on."""

LINEAGE = (PARENT_JOB, PARENT_MODEL_URI, PARENT_BASE_MODEL_URI, PARENT_ADAPTERS, PARENT_OUTPUT_URI, PARENT_DATA_REPORT_DIGEST,
           PARENT_TEST_SET_URI)
"""What a job with spec.model.fromJob gets besides :data:`SET_BY_OPERATOR` (finetune_api.documents.Lineage)."""

SET_BY_OPERATOR = (JOB_NAME, NAMESPACE, ATTEMPT, METRICS_PORT, TERMINATION_LOG, CACHE_DIR, WORK_DIR, JOB_UID)
"""What every training pod gets from the operator's builder."""

READ_BY_TRAINER = (METRICS_PORT, TERMINATION_LOG, CACHE_DIR, WORK_DIR, LOG_LEVEL, JOB_UID, NAMESPACE, MLFLOW_PARENT_RUN_ID, *SWEEP)
"""What the trainer reads (each with a default for runs outside a pod)."""
