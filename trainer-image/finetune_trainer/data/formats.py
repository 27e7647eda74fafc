"""Stage 2: turn a raw row into a record of the job's format, or say why it is malformed.

Records are plain dicts, the same shape for every input file type:

- ``text``:              ``{"text": str}``
- ``prompt-completion``: ``{"prompt": str, "completion": str}``
- ``chat``:              ``{"messages": [{"role": str, "content": str}, ...]}``
- ``classification``:    ``{"text": str, "label": str}``
- ``preference``:        ``{"prompt": str | messages, "chosen": str, "rejected": str}`` (see :mod:`.preference`)

Column names come from ``dataset.fields``. In CSV files a chat's messages column holds the JSON list.
Labels are kept as strings (a JSON ``1`` and a CSV ``"1"`` are the same class).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from finetune_api.spec import FieldNames

TEXT = "text"
PROMPT_COMPLETION = "prompt-completion"
CHAT = "chat"
CLASSIFICATION = "classification"
PREFERENCE = "preference"
FORMATS = (TEXT, PROMPT_COMPLETION, CHAT, CLASSIFICATION, PREFERENCE)
LM_FORMATS = (TEXT, PROMPT_COMPLETION, CHAT)

Record = dict[str, Any]  # str values, except chat "messages": list[{"role": str, "content": str}]


class _Unfit(Exception):
    """A row does not fit the format; the message says why."""


def parse_record(row: dict[str, Any], fmt: str, fields: FieldNames) -> Record | str:
    """The record for ``row``, or a string saying why the row does not fit the format."""
    try:
        if fmt == TEXT:
            return {"text": _string(row, fields.text)}
        if fmt == CLASSIFICATION:
            return {"text": _string(row, fields.text), "label": _label(row, fields.label)}
        if fmt == PROMPT_COMPLETION:
            return {"prompt": _string(row, fields.prompt), "completion": _string(row, fields.completion)}
        if fmt == CHAT:
            return {"messages": _messages(row.get(fields.messages), fields.messages)}
        if fmt == PREFERENCE:
            from finetune_trainer.data import preference

            return preference.parse(row, fields)
    except _Unfit as unfit:
        return str(unfit)
    raise ValueError(f"unknown dataset format {fmt!r}")


def columns(fmt: str, fields: FieldNames) -> list[str]:
    """The columns :func:`parse_record` reads for ``fmt`` (all a columnar file needs to be read for)."""
    by_format = {
        TEXT: [fields.text],
        CLASSIFICATION: [fields.text, fields.label],
        PROMPT_COMPLETION: [fields.prompt, fields.completion],
        CHAT: [fields.messages],
        PREFERENCE: [fields.prompt, fields.chosen, fields.rejected],
    }
    if fmt not in by_format:
        raise ValueError(f"unknown dataset format {fmt!r}")
    return by_format[fmt]


def _string(row: dict[str, Any], column: str) -> str:
    """The column's text (numbers are accepted as text)."""
    value = row.get(column)
    if value is None:
        raise _Unfit(f"missing column {column!r}")
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise _Unfit(f"column {column!r} is a {type(value).__name__}, not text")


def _label(row: dict[str, Any], column: str) -> str:
    label = row.get(column)
    if label is None or label == "" or isinstance(label, (bool, dict, list)):
        raise _Unfit(f"missing or invalid label column {column!r}")
    if isinstance(label, float) and label.is_integer():
        label = int(label)  # 1.0 from a float column is class "1"
    return str(label).strip()


def _messages(value: Any, column: str) -> list[dict[str, str]]:
    if value is None:
        raise _Unfit(f"missing column {column!r}")
    if isinstance(value, str):  # CSV cells hold the JSON list
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise _Unfit(f"column {column!r} is not a JSON list of messages") from None
    if not isinstance(value, list) or not value:
        raise _Unfit(f"column {column!r} must be a non-empty list of {{role, content}} messages")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise _Unfit(f"message {i} is a {type(message).__name__}, not a {{role, content}} object")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role:
            raise _Unfit(f"message {i} has no role")
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise _Unfit(f"message {i} content is a {type(content).__name__}, not text")
        messages.append({"role": role, "content": content})
    return messages


# ------------------------------------------------------------------------------ record helpers


def texts(record: Record) -> list[str]:
    """The record's free-text fields (what :func:`map_texts` applies to), in order."""
    if "chosen" in record:
        from finetune_trainer.data import preference

        return preference.texts(record)
    if "messages" in record:
        return [m["content"] for m in record["messages"]]
    return [record[key] for key in ("text", "prompt", "completion") if key in record]


def map_texts(record: Record, fn: Callable[[str], str]) -> Record:
    """A copy of ``record`` with ``fn`` applied to every free-text field (never to roles or labels)."""
    if "chosen" in record:
        from finetune_trainer.data import preference

        return preference.map_texts(record, fn)
    if "messages" in record:
        return {"messages": [{"role": m["role"], "content": fn(m["content"])} for m in record["messages"]]}
    out = dict(record)
    for key in ("text", "prompt", "completion"):
        if key in out:
            out[key] = fn(out[key])
    return out


def is_empty(record: Record) -> bool:
    """Nothing to learn from: no text, no completion, or no assistant content (a pair: an empty response)."""
    if "chosen" in record:
        from finetune_trainer.data import preference

        return preference.is_empty(record)
    if "messages" in record:
        return not any(m["content"].strip() for m in record["messages"] if m["role"] == "assistant")
    if "completion" in record:
        return not record["completion"].strip()
    return not record["text"].strip()


def content_text(record: Record) -> str:
    """All the record's text in one string (labels excluded): the ``row`` key."""
    return key_text(record, "row")


def _chat_part(messages: list[dict[str, str]], key: str) -> list[dict[str, str]]:
    if key == "turns":
        return [m for m in messages if m["role"] != "system"]
    if key == "userTurns":
        return [m for m in messages if m["role"] == "user"]
    if key == "completion":
        return [m for m in messages if m["role"] == "assistant"]
    if key == "prompt":
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=len(messages))
        return messages[:last]
    return messages


def key_text(record: Record, key: str) -> str:
    """The part of ``record`` that duplicates and leakage are judged on (``dedupe.key``, ``leakageKey``).

    ``row`` is everything; ``turns`` leaves out chat system messages (a long shared system prompt would
    otherwise make different conversations near-duplicates); ``prompt``, ``completion`` and ``userTurns``
    take one side. A choice that selects nothing in a row (a chat with no user turn) falls back to the row.
    Preference pairs: see :func:`.preference.key_text`.
    """
    if "chosen" in record:
        from finetune_trainer.data import preference

        return preference.key_text(record, key)
    if "messages" in record:
        chosen = _chat_part(record["messages"], key) or record["messages"]
        return "\n".join(f"{m['role']}: {m['content']}" for m in chosen)
    if "completion" in record:
        if key in ("prompt", "userTurns"):
            return record["prompt"]
        if key == "completion":
            return record["completion"]
        return f"{record['prompt']}\n{record['completion']}"
    return record["text"]
