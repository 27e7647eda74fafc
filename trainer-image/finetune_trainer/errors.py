"""The trainer's exceptions, one class per entry of the failure catalogue (:mod:`finetune_api.failures`).

The trainer's entry point catches :class:`TrainerError`, writes ``"<Reason>: <message>"`` to the
termination-message file and exits with ``exit_code``. The operator reads that line back into the
FineTuneJob status, and treats codes in :data:`PERMANENT_EXIT_CODES` as not worth a retry. The
reasons, codes and permanence are data in the catalogue; this module only gives each one a class to
raise and catch.
"""

from __future__ import annotations

from finetune_api.failures import CATALOGUE, EXIT_PREEMPTED, GENERIC, PERMANENT_EXIT_CODES, Failure, termination_line

__all__ = [
    "EXIT_PREEMPTED",
    "PERMANENT_EXIT_CODES",
    "TrainerError",
    "InvalidConfig",
    "DatasetNotFound",
    "MalformedData",
    "UnknownLabel",
    "EmptyDataset",
    "LeakageDetected",
    "ModelNotFound",
    "S3AuthError",
    "S3EndpointError",
    "UnsupportedHardware",
    "OutOfMemory",
    "RetentionExceeded",
    "CheckpointError",
    "OutputClaimed",
    "RegressionDetected",
    "ParentModelInvalid",
]


class TrainerError(Exception):
    """Base class. ``permanent`` errors fail the job at once; others may succeed on a retry."""

    reason = GENERIC.reason
    exit_code = GENERIC.exit_code
    permanent = GENERIC.permanent

    def __init__(self, message: str):
        super().__init__(message)
        self.message = " ".join(str(message).split())  # one line, always

    def line(self) -> str:
        return termination_line(self.reason, self.message)


def _error_class(failure: Failure) -> type[TrainerError]:
    attrs = {"reason": failure.reason, "exit_code": failure.exit_code, "permanent": failure.permanent, "__doc__": failure.doc, "__module__": __name__}
    return type(failure.reason, (TrainerError,), attrs)


ERRORS: dict[str, type[TrainerError]] = {failure.reason: _error_class(failure) for failure in CATALOGUE}
"""Every catalogue reason's exception class, by reason."""

# Named module attributes, so ``from finetune_trainer.errors import MalformedData`` (and a reader's
# "go to definition") work; tests/unit/api/test_failures.py keeps them equal to the catalogue.
InvalidConfig = ERRORS["InvalidConfig"]
DatasetNotFound = ERRORS["DatasetNotFound"]
MalformedData = ERRORS["MalformedData"]
UnknownLabel = ERRORS["UnknownLabel"]
EmptyDataset = ERRORS["EmptyDataset"]
LeakageDetected = ERRORS["LeakageDetected"]
ModelNotFound = ERRORS["ModelNotFound"]
S3AuthError = ERRORS["S3AuthError"]
S3EndpointError = ERRORS["S3EndpointError"]
UnsupportedHardware = ERRORS["UnsupportedHardware"]
OutOfMemory = ERRORS["OutOfMemory"]
RetentionExceeded = ERRORS["RetentionExceeded"]
CheckpointError = ERRORS["CheckpointError"]
OutputClaimed = ERRORS["OutputClaimed"]
RegressionDetected = ERRORS["RegressionDetected"]
ParentModelInvalid = ERRORS["ParentModelInvalid"]
