"""One wording for a spec that does not validate, used by the operator and the trainer alike.

The operator puts it in the FineTuneJob status (reason InvalidSpec), the trainer in its termination
line (reason InvalidConfig), so a user who runs the trainer locally on a manifest reads the same words
as the status of the same manifest applied to a cluster.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from pydantic.alias_generators import to_camel


def field_path(loc: tuple[Any, ...]) -> str:
    """``('hyperparameters', 'learning_rate')`` -> ``spec.hyperparameters.learningRate`` (camelCase, as
    written in a manifest); list indices as ``[i]``."""
    parts = []
    for p in loc:
        if isinstance(p, int):
            parts.append(f"[{p}]")
        else:
            parts.append(("." if parts else "") + to_camel(str(p)))
    return "spec." + "".join(parts) if parts else "spec"


def validation_message(err: ValidationError) -> str:
    """One line naming the first offending field, plus how many more problems there are."""
    errors = err.errors()
    first = errors[0]
    loc = tuple(p for p in first.get("loc", ()) if p != "__root__")
    msg = str(first.get("msg", "invalid")).removeprefix("Value error, ")
    line = f"{field_path(loc)}: {msg}"
    if len(errors) > 1:
        line += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return line
