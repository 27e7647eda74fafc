"""What this operator wrote that its watches have not shown it yet.

A reconcile reads the world from watch-fed indexes (:mod:`finetune_operator.main`), which trail the API
server by the time an event takes to arrive, and two of the operator's own writes come back to it that
way, late:

- a status patch: until the FineTuneJob's new version arrives, an event of a child (or a resync) hands
  the reconcile the version the patch was made against, whose status precondition then fails (a 409, a
  GET, a second decision). :meth:`Expectations.freshest` gives it the patched version instead: the
  object at the old resourceVersion plus the status the API server answered the patch with *is* the
  object at the new one (the precondition guarantees nothing else changed in between).
- a new Job: until the Job's ADDED event reaches the index, the state looks like "no Job yet", and a
  reconcile would try to create it again (four children, four 409s, four GETs to check whose they
  are). :meth:`Expectations.awaiting_job` says to wait instead: that ADDED event reconciles the
  FineTuneJob anyway (Kopf fills the index before it calls the Job's event handler), so nothing is
  lost by not reconciling before it. After ``ttl`` seconds without it (a Job deleted before the watch
  ever listed it) reconciles go ahead as before.

This is the Job controller's own remedy for the same lag (``ControllerExpectations`` in
k8s.io/kubernetes/pkg/controller). Everything here is in memory: an operator that restarts starts from
what its watches list, as before.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from finetune_operator.views import JobView


@dataclass(frozen=True)
class _Written:
    before: str  # the resourceVersion the status patch was made against
    after: str  # the resourceVersion it produced
    status: dict[str, Any]  # the status the API server answered with


class Expectations:
    def __init__(self, ttl: float = 30.0, clock: Callable[[], float] = time.monotonic):
        self.ttl = ttl
        self.clock = clock
        self._written: dict[str, _Written] = {}
        self._jobs: dict[str, tuple[str, float]] = {}  # uid -> (name of the Job created, deadline)
        self._lock = threading.Lock()

    def wrote_status(self, uid: str, before: str | None, patched: Any) -> None:
        """The status patch of FineTuneJob ``uid`` made against ``before`` returned ``patched``."""
        if not before or not isinstance(patched, Mapping):
            return
        after = (patched.get("metadata") or {}).get("resourceVersion")
        if not after:
            return
        with self._lock:
            self._written[uid] = _Written(before, str(after), dict(patched.get("status") or {}))

    def freshest(self, uid: str, body: dict[str, Any]) -> dict[str, Any]:
        """``body``, or when it is the version our last status patch replaced, the version that patch made."""
        meta = body.get("metadata") or {}
        version = meta.get("resourceVersion")
        with self._lock:
            written = self._written.get(uid)
            if written is not None and version == written.after:  # the watch caught up: nothing to remember
                del self._written[uid]
        if written is None or version != written.before:
            return body
        return {**body, "metadata": {**meta, "resourceVersion": written.after}, "status": dict(written.status)}

    def created_job(self, uid: str, name: str) -> None:
        with self._lock:
            self._jobs[uid] = (name, self.clock() + self.ttl)

    def awaiting_job(self, uid: str, jobs: Iterable[JobView]) -> bool:
        """Whether FineTuneJob ``uid`` created a Job that ``jobs`` (its index entry) does not show yet."""
        with self._lock:
            expected = self._jobs.get(uid)
            if expected is None:
                return False
            name, deadline = expected
            if any(j.name == name for j in jobs) or self.clock() >= deadline:
                del self._jobs[uid]
                return False
            return True

    def forget(self, uid: str) -> None:
        with self._lock:
            self._written.pop(uid, None)
            self._jobs.pop(uid, None)
