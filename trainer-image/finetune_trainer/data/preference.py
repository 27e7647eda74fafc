"""Preference pairs (``dataset.format: preference``): parsing, the texts cleaning and dedupe see, and tokenisation.

A record is ``{"prompt": str | [{role, content}, ...], "chosen": str, "rejected": str}``. The prompt is plain
text, or a conversation rendered with the tokenizer's chat template (``add_generation_prompt``); the responses are
text, or (as in TRL's conversational format) a list of assistant messages, or one ``{role, content}`` object,
reduced to the assistant text. Every free text (the prompt's messages, both responses) is normalised, redacted
and lowercased like any other format's (:func:`map_texts`).

Dedupe keys (``preprocessing.dedupe.key``): ``row``/``turns`` compare prompt, chosen and rejected (``turns``
without system messages), so several pairs for one prompt (common in preference data) are kept; ``prompt`` and
``userTurns`` the prompt; ``completion`` both responses. The leakage checks always compare the prompt
(:func:`leakage_key`): a test prompt whose pair was trained on is leaked whatever its responses.

Tokenisation (:func:`tokenize_pair`): ``prompt + chosen`` and ``prompt + rejected`` become two rows, each with
``labels`` -100 on the prompt tokens (the preference losses score the response tokens only) and EOS after the
response. The prompt is tokenised alone, as at inference where the model continues the prompt's tokens, so both
rows share exactly the same prompt ids.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from finetune_trainer.data.tokenize import IGNORE_INDEX, Tokenized

if TYPE_CHECKING:
    from finetune_api.spec import FieldNames
    from transformers import PreTrainedTokenizerBase

PREFERENCE = "preference"
RESPONSES = ("chosen", "rejected")
PAIR_COLUMNS = ("rejected_input_ids", "rejected_labels")
"""What a pair's staged and final rows carry besides ``input_ids``/``labels`` (the prompt + chosen row)."""

Record = dict[str, Any]


def is_pair(record: Record) -> bool:
    return "chosen" in record and "rejected" in record


# ------------------------------------------------------------------------------------------- parsing


class _NotAPair(Exception):
    """A row does not fit the preference format; the message says why."""


def parse(row: dict[str, Any], fields: FieldNames) -> Record | str:
    """The pair in ``row``, or a string saying why the row is not one."""
    try:
        return {
            "prompt": _prompt(row.get(fields.prompt), fields.prompt),
            "chosen": _response(row.get(fields.chosen), fields.chosen),
            "rejected": _response(row.get(fields.rejected), fields.rejected),
        }
    except _NotAPair as why:
        return str(why)


def _json(value: Any) -> Any:
    if isinstance(value, str) and value[:1] in "[{":
        try:
            return json.loads(value)  # CSV cells hold the JSON list
        except json.JSONDecodeError:
            return value
    return value


def _text(value: Any, column: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise _NotAPair(f"column {column!r} is a {type(value).__name__}, not text")


def _prompt(value: Any, column: str) -> str | list[dict[str, str]]:
    value = _json(value)
    if value is None:
        raise _NotAPair(f"missing column {column!r}")
    if not isinstance(value, list):
        return _text(value, column)
    if not value:
        raise _NotAPair(f"column {column!r} must be text or a non-empty list of {{role, content}} messages")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or not message["role"]:
            raise _NotAPair(f"message {i} of column {column!r} is not a {{role, content}} object")
        content = message.get("content") or ""
        if not isinstance(content, str):
            raise _NotAPair(f"message {i} of column {column!r} content is a {type(content).__name__}, not text")
        messages.append({"role": message["role"], "content": content})
    return messages


def _response(value: Any, column: str) -> str:
    value = _json(value)
    if value is None:
        raise _NotAPair(f"missing column {column!r}")
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        return _text(value, column)
    if not value or not all(isinstance(m, dict) and m.get("role") == "assistant" for m in value):
        raise _NotAPair(f"column {column!r} must be text or a list of assistant {{role, content}} messages")
    contents = [m.get("content") or "" for m in value]
    if not all(isinstance(c, str) for c in contents):
        raise _NotAPair(f"column {column!r} holds a message whose content is not text")
    return "\n".join(contents)


# ------------------------------------------------------------------------------------ record helpers


def texts(record: Record) -> list[str]:
    prompt = record["prompt"]
    head = [m["content"] for m in prompt] if isinstance(prompt, list) else [prompt]
    return head + [record["chosen"], record["rejected"]]


def map_texts(record: Record, fn: Callable[[str], str]) -> Record:
    prompt = record["prompt"]
    mapped = [{"role": m["role"], "content": fn(m["content"])} for m in prompt] if isinstance(prompt, list) else fn(prompt)
    return {"prompt": mapped, "chosen": fn(record["chosen"]), "rejected": fn(record["rejected"])}


def is_empty(record: Record) -> bool:
    """A pair with an empty response has nothing to compare."""
    return not record["chosen"].strip() or not record["rejected"].strip()


def _prompt_text(prompt: str | list[dict[str, str]], roles: tuple[str, ...] | None = None) -> str:
    if isinstance(prompt, str):
        return prompt
    chosen = [m for m in prompt if roles is None or m["role"] in roles] or prompt
    return "\n".join(f"{m['role']}: {m['content']}" for m in chosen)


def key_text(record: Record, key: str) -> str:
    """The part of a pair that dedupe (and, through :func:`leakage_key`, the leakage checks) compare."""
    prompt = record["prompt"]
    if key == "prompt":
        return _prompt_text(prompt)
    if key == "userTurns":
        return _prompt_text(prompt, ("user",))
    responses = f"chosen: {record['chosen']}\nrejected: {record['rejected']}"
    if key == "completion":
        return responses
    if key == "turns" and isinstance(prompt, list):
        return _prompt_text([m for m in prompt if m["role"] != "system"] or prompt) + "\n" + responses
    return _prompt_text(prompt) + "\n" + responses


def leakage_key(configured: str) -> str:
    """The key the leakage checks compare pairs on: the prompt (its user messages with ``userTurns``)."""
    return "userTurns" if configured == "userTurns" else "prompt"


# ------------------------------------------------------------------------------------ tokenisation


@dataclass
class PairTokenized(Tokenized):
    """prompt + chosen (``input_ids``/``labels``) and prompt + rejected, each truncated to maxSeqLength."""

    rejected_input_ids: list[int] | None = None
    rejected_labels: list[int] | None = None

    @property
    def trainable(self) -> int:
        """Response tokens of the shorter side: a pair whose response is truncated away cannot be compared."""
        rejected = sum(1 for label in self.rejected_labels or [] if label != IGNORE_INDEX)
        return min(super().trainable, rejected)

    @property
    def token_count(self) -> int:
        return len(self.input_ids) + len(self.rejected_input_ids or [])

    def columns(self) -> dict[str, list[int]]:
        return {"rejected_input_ids": self.rejected_input_ids or [], "rejected_labels": self.rejected_labels or []}


def _prompt_and_responses(record: Record, tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[list[int]]]:
    """The prompt's ids and each response's ids (EOS appended unless the rendering ends with it)."""
    prompt = record["prompt"]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if isinstance(prompt, str):
        prompt_ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
        return prompt_ids, [list(tokenizer(record[r], add_special_tokens=False)["input_ids"]) + eos for r in RESPONSES]
    if not getattr(tokenizer, "chat_template", None):
        from finetune_trainer.errors import InvalidConfig

        raise InvalidConfig(
            "dataset.format preference with chat prompts (lists of messages) needs a tokenizer with a chat template, and "
            "the base model's tokenizer has none. Use a chat/instruct model, or give the prompts as text."
        )
    head = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    prompt_ids = list(tokenizer(head, add_special_tokens=False)["input_ids"])
    responses = []
    for name in RESPONSES:
        full = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": record[name]}], tokenize=False)
        tail = full[len(head):] if full.startswith(head) else record[name]  # a template that rewrites earlier turns
        ids = list(tokenizer(tail, add_special_tokens=False)["input_ids"])
        if tokenizer.eos_token and not full.rstrip().endswith(tokenizer.eos_token):
            ids += eos
        responses.append(ids)
    return prompt_ids, responses


def tokenize_pair(record: Record, tokenizer: PreTrainedTokenizerBase, max_len: int) -> PairTokenized:
    prompt_ids, (chosen, rejected) = _prompt_and_responses(record, tokenizer)
    masked = [IGNORE_INDEX] * len(prompt_ids)
    c_ids, r_ids = prompt_ids + chosen, prompt_ids + rejected
    length = max(len(c_ids), len(r_ids))
    return PairTokenized(
        input_ids=c_ids[:max_len], labels=(masked + chosen)[:max_len], length=length, truncated=length > max_len,
        rejected_input_ids=r_ids[:max_len], rejected_labels=(masked + rejected)[:max_len],
    )
