"""Failures a user can cause, each with a CamelCase reason, a one-line message and its own exit code.

The trainer's entry point catches :class:`TrainerError`, writes ``"<Reason>: <message>"`` to the
termination-message file and exits with ``exit_code``. The operator reads that line back into the
FineTuneJob status, and treats codes in :data:`PERMANENT_EXIT_CODES` as not worth a retry.
"""

from __future__ import annotations


class TrainerError(Exception):
    """Base class. ``permanent`` errors fail the job at once; others may succeed on a retry."""

    reason = "TrainerError"
    exit_code = 10
    permanent = True

    def __init__(self, message: str):
        super().__init__(message)
        self.message = " ".join(str(message).split())  # one line, always

    def line(self) -> str:
        return f"{self.reason}: {self.message}"


def _error(name: str, code: int, permanent: bool = True, doc: str = "") -> type[TrainerError]:
    return type(name, (TrainerError,), {"reason": name, "exit_code": code, "permanent": permanent, "__doc__": doc})


InvalidConfig = _error("InvalidConfig", 11, doc="The job config does not validate against the FineTuneJob spec.")
DatasetNotFound = _error("DatasetNotFound", 12, doc="A dataset URI names no object, or a prefix holds no data files.")
MalformedData = _error("MalformedData", 13, doc="More rows than allowed could not be parsed, or a file is unreadable.")
UnknownLabel = _error("UnknownLabel", 14, doc="A row's label is not in spec.model.labels.")
EmptyDataset = _error("EmptyDataset", 15, doc="No rows are left after cleaning.")
LeakageDetected = _error("LeakageDetected", 16, doc="Validation/test examples appear in train and leakageCheck is fail.")
ModelNotFound = _error("ModelNotFound", 17, doc="The base model URI holds no loadable model.")
S3AuthError = _error("S3AuthError", 18, doc="The object store rejected the credentials.")
S3EndpointError = _error("S3EndpointError", 19, permanent=False, doc="The object store could not be reached.")
UnsupportedHardware = _error("UnsupportedHardware", 20, doc="e.g. QLoRA (4-bit) requested without a CUDA GPU.")
OutOfMemory = _error("OutOfMemory", 21, doc="The device ran out of memory; lower batchSize or maxSeqLength.")
RetentionExceeded = _error("RetentionExceeded", 22, doc="Loss on the retention set rose past the allowed threshold.")
CheckpointError = _error("CheckpointError", 23, permanent=False, doc="A checkpoint could not be written or read.")

# Exit code used after a clean checkpoint-and-exit on SIGTERM (preemption, suspend, pod deletion).
EXIT_PREEMPTED = 143

PERMANENT_EXIT_CODES = frozenset(
    cls.exit_code for cls in TrainerError.__subclasses__() if cls.permanent
) | {TrainerError.exit_code}
