"""Status bookkeeping for the state machine: timestamps and Kubernetes-style conditions (one per
type; ``lastTransitionTime`` moves only when a condition's status flips)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from finetune_api.status import ConditionType, Phase

# The condition that is True in each phase (Pending has none).
_PHASE_CONDITION = {
    Phase.running.value: ConditionType.running,
    Phase.restarting.value: ConditionType.restarting,
    Phase.suspended.value: ConditionType.suspended,
    Phase.succeeded.value: ConditionType.succeeded,
    Phase.failed.value: ConditionType.failed,
}


def now_utc() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


def iso(t: datetime) -> str:
    return t.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    return datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)


def set_phase(status: dict[str, Any], phase: str, reason: str, message: str, now: datetime, generation: int) -> None:
    """Set phase/reason/message and keep one condition per type; lastTransitionTime moves only when a
    condition's status flips."""
    status["phase"], status["reason"], status["message"] = phase, reason, message
    conditions = {c["type"]: dict(c) for c in status.get("conditions") or []}
    active = _PHASE_CONDITION.get(phase)
    for ctype in ConditionType:
        want = "True" if ctype is active else "False"
        old = conditions.get(ctype.value)
        if old is None and want == "False":
            continue
        cond: dict[str, Any]
        if want == "True":
            cond = {"type": ctype.value, "status": want, "reason": reason, "message": message}
        elif old is not None and old.get("status") == "False":
            cond = dict(old)
        else:
            cond = {"type": ctype.value, "status": want, "reason": reason, "message": f"phase is {phase}"}
        if old is None or old.get("status") != want:  # flipped
            cond["lastTransitionTime"] = iso(now)
        else:
            cond["lastTransitionTime"] = old.get("lastTransitionTime", iso(now))
        cond["observedGeneration"] = generation
        conditions[ctype.value] = cond
    status["conditions"] = [conditions[t.value] for t in ConditionType if t.value in conditions]
