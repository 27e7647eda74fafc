"""The failure catalogue: how the trainer says why it stopped, and how the operator reads it back.

The trainer ends every failure a user can cause with one line ``"<Reason>: <message>"`` in the pod's
termination-message file and exits with that reason's own code. The operator finds the line in the
pod status (under torchrun it sits inside the launcher's log tail) and decides from the reason, or
failing that from the exit code, whether a retry can help. Both sides read this one table, so a
reason added here is known to both at once.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Failure:
    """One entry of the catalogue. ``permanent`` failures fail the job at once; others are retried."""

    reason: str
    exit_code: int
    permanent: bool
    doc: str


# The base reason: a failure the trainer recognised but that has no more specific entry.
GENERIC = Failure("TrainerError", 10, True, "A failure the trainer recognised, without a more specific reason.")

CATALOGUE: tuple[Failure, ...] = (
    Failure("InvalidConfig", 11, True, "The job config does not validate against the FineTuneJob spec."),
    Failure("DatasetNotFound", 12, True, "A dataset URI names no object, or a prefix holds no data files."),
    Failure("MalformedData", 13, True, "More rows than allowed could not be parsed, or a file is unreadable."),
    Failure("UnknownLabel", 14, True, "A row's label is not in spec.model.labels."),
    Failure("EmptyDataset", 15, True, "No rows are left after cleaning."),
    Failure("LeakageDetected", 16, True, "Validation/test examples appear in train and leakageCheck is fail."),
    Failure("ModelNotFound", 17, True, "The base model URI holds no loadable model."),
    Failure("S3AuthError", 18, True, "The object store rejected the credentials."),
    Failure("S3EndpointError", 19, False, "The object store could not be reached."),
    Failure("UnsupportedHardware", 20, True, "e.g. QLoRA (4-bit) requested without a CUDA GPU."),
    Failure("OutOfMemory", 21, True, "The device ran out of memory; lower batchSize or maxSeqLength."),
    Failure("RetentionExceeded", 22, True, "Loss on the retention set rose past the allowed threshold."),
    Failure("CheckpointError", 23, False, "A checkpoint could not be written or read."),
    Failure("OutputClaimed", 24, True, "spec.output.uri is claimed by another FineTuneJob (another uid): pick another output."),
    Failure("RegressionDetected", 25, True,
            "On its parent's test set the new model is worse than the parent by more than evaluation.regression.maxDrop "
            "and the action is fail: no model is exported."),
    Failure("ParentModelInvalid", 26, True,
            "model.fromJob: the parent job's model, test set or progress document could not be read or is not what the "
            "parent's trainer writes."),
)

BY_REASON: dict[str, Failure] = {f.reason: f for f in CATALOGUE}
"""The catalogue's specific reasons (not :data:`GENERIC`), by name: what the operator recognises in a
termination message."""

EXIT_PREEMPTED = 143
"""Exit code after a clean checkpoint-and-exit on SIGTERM (preemption, suspend, pod deletion)."""

PREEMPTED_REASON = "Preempted"
"""Reason of the termination line written on SIGTERM; not a failure, so not in the catalogue."""

PERMANENT_EXIT_CODES = frozenset(f.exit_code for f in CATALOGUE if f.permanent) | {GENERIC.exit_code}
"""Exit codes not worth a retry, for when a pod's message carries no recognisable reason."""


def one_line(message: object) -> str:
    """``message`` with every run of whitespace (newlines included) collapsed to one space."""
    return " ".join(str(message).split())


def termination_line(reason: str, message: object) -> str:
    """The one line the trainer leaves behind: ``"<Reason>: <message>"``, always on one line."""
    return f"{reason}: {one_line(message)}"


def find_termination_line(message: str) -> tuple[Failure, str] | None:
    """The trainer's own ``Reason: message`` line in a pod's termination message, with its catalogue
    entry; the last such line wins. Under torchrun the message is the log tail, with the launcher's
    summary around the line, so every line is looked at, not only the last."""
    for line in reversed([part.strip() for part in message.splitlines() if part.strip()]):
        failure = BY_REASON.get(line.split(":", 1)[0])
        if failure is not None:
            return failure, line
    return None


_LAUNCHER_PREFIXES = ("[", "time", "host", "rank", "exitcode", "error_file", "traceback")


def last_meaningful_line(message: str) -> str:
    """The last line of a termination message that is not torchrun's summary decoration (rules,
    ``[...]`` log headers, ``time:``/``host:``/``rank:``... fields); for messages without a reason."""
    lines = [
        line.strip()
        for line in message.splitlines()
        if line.strip().strip("=-") and not line.strip().startswith(_LAUNCHER_PREFIXES)
    ]
    return lines[-1] if lines else message.strip()[:200]


@dataclass(frozen=True)
class Refusal:
    """A reason the operator gives, before any pod of the job exists, when the operator's own
    restrictions (the chart's values) refuse what a FineTuneJob asks for. Not written by the trainer,
    so not in :data:`CATALOGUE`; the reason is the FineTuneJob's status.reason and its Event's."""

    reason: str
    doc: str


IMAGE_NOT_ALLOWED = Refusal(
    "ImageNotAllowed", "spec.resources.image is not covered by the chart's trainer.allowedImages (the job Fails).")
PRIORITY_CLASS_NOT_ALLOWED = Refusal(
    "PriorityClassNotAllowed",
    "spec.resources.priorityClassName is not in the chart's trainer.allowedPriorityClasses (the job Fails).")
SECRET_NOT_LABELLED = Refusal(
    "SecretNotLabelled",
    "storage.credentialsSecret lacks the labels the chart's storage.credentialsSecretLabels require; its values "
    "are never read (the job Fails).")
SECRET_FORBIDDEN = Refusal(
    "SecretForbidden",
    "The operator may not read Secrets in the job's namespace (chart value rbac.clusterWideSecrets: false and no "
    "RoleBinding there); the job Fails.")
NAMESPACE_NOT_ENABLED = Refusal(
    "NamespaceNotEnabled",
    "The job's namespace lacks the labels the chart's namespaceSelector requires: nothing is created and no Secret "
    "is read there; the job stays Pending until the namespace is labelled.")

# The labels the docs, the examples and the devcluster use for the two opt-ins (chart values
# storage.credentialsSecretLabels and namespaceSelector); the chart may name any others.
CREDENTIALS_SECRET_LABEL = ("finetune.io/credentials", "true")
NAMESPACE_ENABLED_LABEL = ("finetune.io/enabled", "true")

PARENT_JOB_NOT_FOUND = Refusal(
    "ParentJobNotFound",
    "spec.model.fromJob (or distillation.teacher.fromJob) names no FineTuneJob in the job's namespace yet: nothing is "
    "created, the job stays Pending and goes on once that job exists (as a pod waits for a missing ConfigMap), so "
    "`kubectl apply -f` of a folder works in any order.")
PARENT_JOB_FAILED = Refusal(
    "ParentJobFailed",
    "spec.model.fromJob (or distillation.teacher.fromJob) names this job itself, a FineTuneJob that Failed, or one "
    "that Succeeded without a model this job can use (no status.modelUri, another task, an output this job's output "
    "overlaps; for a teacher, only an adapter); the job Fails.")
WAITING_FOR_PARENT_JOB = Refusal(
    "WaitingForParentJob",
    "spec.model.fromJob (or distillation.teacher.fromJob) names a FineTuneJob that has not finished: nothing is "
    "created yet, the job stays Pending and starts once that job Succeeded (or Fails with ParentJobFailed).")

REFUSALS: tuple[Refusal, ...] = (IMAGE_NOT_ALLOWED, PRIORITY_CLASS_NOT_ALLOWED, SECRET_NOT_LABELLED, SECRET_FORBIDDEN,
                                 NAMESPACE_NOT_ENABLED, PARENT_JOB_NOT_FOUND, PARENT_JOB_FAILED, WAITING_FOR_PARENT_JOB)
