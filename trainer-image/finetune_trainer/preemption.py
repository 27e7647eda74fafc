"""SIGTERM: the pod is being stopped (suspend, preemption, a failed peer). Checkpoint if training, then exit.

During the training loop the handler only sets a flag, which the loop checks after each optimizer step
(every rank agrees through a collective), so the step finishes, a checkpoint is written and the process
exits with :data:`~finetune_api.failures.EXIT_PREEMPTED`. Before or after the loop there is nothing to
save: the handler raises :class:`Preempted` at once.
"""

from __future__ import annotations

import logging
import signal
from types import FrameType
from typing import Any

from .errors import EXIT_PREEMPTED

log = logging.getLogger(__name__)


class Preempted(BaseException):
    """SIGTERM was handled: a checkpoint is written, exit with errors.EXIT_PREEMPTED.

    A BaseException, like KeyboardInterrupt: it can be raised by the signal handler anywhere (inside a
    library call during data preparation or model loading), and no ``except Exception`` on the way up
    may turn it into a failure such as ModelNotFound.
    """

    exit_code = EXIT_PREEMPTED


class SigtermFlag:
    """SIGTERM during training sets a flag the loop checks after each step; before/after it, we exit now."""

    def __init__(self) -> None:
        self.requested = False
        self.in_loop = False
        self._previous: Any = None

    def install(self) -> None:
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self._previous or signal.SIG_DFL)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        if not self.in_loop:
            raise Preempted("SIGTERM before training started")
        log.warning("SIGTERM: finishing the current step, then checkpointing and exiting")
