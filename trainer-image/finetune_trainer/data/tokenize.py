"""Stage 5: records -> token ids and loss labels.

- ``text``: ``input_ids`` = the text with the tokenizer's special tokens, then EOS; ``labels`` = ``input_ids``.
- ``prompt-completion``: prompt and completion are tokenised separately (as at inference, where the model
  continues the prompt's tokens) and concatenated, then EOS; ``labels`` is -100 on every prompt token.
- ``chat``: rendered with ``tokenizer.apply_chat_template``; ``labels`` is -100 everywhere except the
  assistant turns (their content and the template's end-of-turn marker, so the model learns to stop).
  Assistant spans are found by rendering the conversation prefix by prefix: turn *i* spans from the end of
  ``render(messages[:i], add_generation_prompt=True)`` to the end of ``render(messages[:i+1])``, mapped to
  tokens with the fast tokenizer's offsets (a slow tokenizer tokenises the pieces between span
  boundaries separately). A template that is not prefix-stable (one that rewrites earlier turns) falls
  back to locating the turn's content in the rendering. EOS is appended only when the rendering does not
  already end with it (most templates close every turn with the model's end-of-turn token).
- ``classification``: ``input_ids`` with the tokenizer's special tokens; the integer label is added later.
- ``prompt-completion`` for an encoder-decoder (``model.task: seq2seq-lm``): stored the same way (prompt ids,
  then completion ids + EOS; ``labels`` -100 on the prompt), so every later stage reads one row shape; the
  collator (:mod:`finetune_trainer.seq2seq`) splits it at the first scored token into the encoder's input and
  the decoder's labels. Prompt and completion are each cut to ``maxSeqLength`` on their own (the prompt by the
  tokenizer, keeping its closing special token), so a long source never pushes the target out.
- ``preference``: two rows per pair, prompt + chosen and prompt + rejected (:mod:`.preference`).

Sequences longer than ``hyperparameters.maxSeqLength`` are cut at the end (a truncated LM row loses its
EOS, which is right: the text did not end there). ``length`` is the token count before truncation,
which is what ``preprocessing.minTokens``/``maxTokens`` compare against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from finetune_trainer.data.formats import CHAT, CLASSIFICATION, PREFERENCE, PROMPT_COMPLETION, TEXT, Record

if TYPE_CHECKING:
    from tokenizers import Encoding, Tokenizer
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
"""Label of a token that is not scored (prompt, padding, a packed row's first token): cross_entropy's
default ignore_index. The trainer's one definition (collate, loss and evaluate import it)."""


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int] | None  # None for classification
    length: int  # tokens before truncation
    truncated: bool

    @property
    def trainable(self) -> int:
        """Tokens that carry loss (classification rows always do)."""
        if self.labels is None:
            return len(self.input_ids)
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


def tokenize_batch(records: Sequence[Record], fmt: str, tokenizer: PreTrainedTokenizerBase, max_len: int, *,
                   seq2seq: bool = False) -> list[Tokenized]:
    if not records:
        return []
    if seq2seq and fmt == PROMPT_COMPLETION:
        return _seq2seq(records, tokenizer, max_len)
    if fmt == TEXT:
        ids = _encode(tokenizer, [r["text"] for r in records], special=True)
        return [_lm(row + _eos(tokenizer), row + _eos(tokenizer), max_len) for row in ids]
    if fmt == PROMPT_COMPLETION:
        prompts = _encode(tokenizer, [r["prompt"] for r in records], special=True)
        completions = _encode(tokenizer, [r["completion"] for r in records], special=False)
        out = []
        for p, c in zip(prompts, completions):
            c = c + _eos(tokenizer)
            out.append(_lm(p + c, [IGNORE_INDEX] * len(p) + c, max_len))
        return out
    if fmt == CHAT:
        return [_chat(r["messages"], tokenizer, max_len) for r in records]
    if fmt == PREFERENCE:
        from finetune_trainer.data.preference import tokenize_pair

        return [tokenize_pair(r, tokenizer, max_len) for r in records]
    if fmt == CLASSIFICATION:
        texts = [r["text"] for r in records]
        if tokenizer.is_fast:
            return _classification_fast(tokenizer, texts, max_len)
        ids = _encode(tokenizer, texts, special=True)
        out = []
        long_rows = [i for i, row in enumerate(ids) if len(row) > max_len]
        if long_rows:  # let the tokenizer truncate, so the closing special token ([SEP], </s>) stays
            cut = tokenizer([texts[i] for i in long_rows], truncation=True, max_length=max_len)["input_ids"]
            truncated = dict(zip(long_rows, cut))
        else:
            truncated = {}
        for i, row in enumerate(ids):
            final = list(truncated.get(i, row))
            out.append(Tokenized(final, None, len(row), i in truncated))
        return out
    raise ValueError(f"unknown dataset format {fmt!r}")


def _classification_fast(tokenizer: PreTrainedTokenizerBase, texts: list[str], max_len: int) -> list[Tokenized]:
    """Classification rows in one tokenizer pass: each text is encoded without special tokens, cut to leave room
    for them, then given them by the tokenizer's own post-processor -- what ``truncation=True, max_length=max_len``
    does, without encoding the long rows a second time. (:func:`_backend` leaves the backend with no truncation of
    its own, so ``post_process`` only adds the special tokens.)"""
    specials = tokenizer.num_special_tokens_to_add()
    backend = _backend(tokenizer)
    side = tokenizer.truncation_side
    post_process = backend.post_process
    out = []
    for encoding in _encode_batch(backend, texts, False):
        length = len(encoding) + specials
        truncated = length > max_len
        if truncated:
            encoding.truncate(max(max_len - specials, 0), direction=side)
        out.append(Tokenized(post_process(encoding, None, True).ids, None, length, truncated))
    return out


def _seq2seq(records: Sequence[Record], tokenizer: PreTrainedTokenizerBase, max_len: int) -> list[Tokenized]:
    """Encoder input (the prompt with the tokenizer's special tokens) and decoder target (completion + EOS), each cut
    to ``max_len`` on its own, stored as one row: ``input_ids`` = source + target, ``labels`` -100 on the source."""
    prompts = [r["prompt"] for r in records]
    sources = _encode(tokenizer, prompts, special=True)
    long_rows = [i for i, row in enumerate(sources) if len(row) > max_len]
    cut = dict(zip(long_rows, tokenizer([prompts[i] for i in long_rows], truncation=True, max_length=max_len)["input_ids"])) if long_rows else {}
    out = []
    for i, (source, target) in enumerate(zip(sources, _encode(tokenizer, [r["completion"] for r in records], special=False))):
        target = target + _eos(tokenizer)
        length = len(source) + len(target)
        source = list(cut.get(i, source))
        truncated = i in cut or len(target) > max_len
        target = target[:max_len]
        out.append(Tokenized(source + target, [IGNORE_INDEX] * len(source) + target, length, truncated))
    return out


def _encode(tokenizer: PreTrainedTokenizerBase, texts: list[str], special: bool) -> list[list[int]]:
    if getattr(tokenizer, "is_fast", False):
        return [encoding.ids for encoding in _encode_batch(_backend(tokenizer), texts, special)]
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=special)["input_ids"]]


def _backend(tokenizer: PreTrainedTokenizerBase) -> Tokenizer:
    """A fast tokenizer's Rust backend (``tokenizers.Tokenizer``), in the state the wrapper's own call puts it in
    before it encodes: no truncation, no padding, the wrapper's ``split_special_tokens``, input (not target) mode.
    One empty wrapper call sets that (the backend keeps whatever truncation or padding its tokenizer.json or the last
    wrapper call left, e.g. the MiniLM's ``tokenizer.json`` pads and truncates to 128).

    Encoding a batch with the backend directly gives the same ids as ``tokenizer(texts)["input_ids"]`` (the wrapper
    calls the same ``encode_batch``) without the wrapper's per-row work: a Python dict per encoding (ids, type ids,
    attention mask), the lists regrouped into a ``BatchEncoding``, a length check per row -- about 40% of the
    tokenisation's CPU time for short rows."""
    tokenizer("", add_special_tokens=False)
    return tokenizer.backend_tokenizer


def _encode_batch(backend: Tokenizer, texts: list[str], special: bool) -> list[Encoding]:
    """``encode_batch_fast`` (tokenizers >= 0.21: the same encodings without character offsets, which nothing here
    reads) where there is one."""
    encode = getattr(backend, "encode_batch_fast", None) or backend.encode_batch
    return encode(texts, add_special_tokens=special)


def _eos(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def _lm(input_ids: list[int], labels: list[int], max_len: int) -> Tokenized:
    length = len(input_ids)
    return Tokenized(input_ids[:max_len], labels[:max_len], length, length > max_len)


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], generation_prompt: bool = False) -> str:
    if not messages:
        return ""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def assistant_char_spans(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], full: str) -> list[tuple[int, int]]:
    """Character spans of ``full`` (the whole rendering) that belong to assistant turns."""
    spans = []
    searched_to = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], generation_prompt=True)
        through = _render(tokenizer, messages[: i + 1])
        if through.startswith(before) and full.startswith(through) and len(through) > len(before):
            spans.append((len(before), len(through)))
            searched_to = len(through)
            continue
        # Not prefix-stable: find the turn's content after the previous span.
        start = full.find(message["content"], searched_to) if message["content"] else -1
        if start >= 0:
            spans.append((start, start + len(message["content"])))
            searched_to = start + len(message["content"])
    return spans


def _chat(messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase, max_len: int) -> Tokenized:
    full = _render(tokenizer, messages)
    spans = assistant_char_spans(tokenizer, messages, full)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        input_ids = list(enc["input_ids"])
        labels = [
            token if end > start and any(s <= start < e for s, e in spans) else IGNORE_INDEX
            for token, (start, end) in zip(input_ids, enc["offset_mapping"])
        ]
    else:  # no offsets: tokenise the pieces between span boundaries separately
        input_ids, labels = [], []
        cuts = sorted({0, len(full), *(b for span in spans for b in span)})
        for start, end in zip(cuts, cuts[1:]):
            piece = tokenizer(full[start:end], add_special_tokens=False)["input_ids"]
            trained = any(s <= start < e for s, e in spans)
            input_ids += piece
            labels += piece if trained else [IGNORE_INDEX] * len(piece)
    eos = tokenizer.eos_token
    if eos and tokenizer.eos_token_id is not None and not full.rstrip().endswith(eos):
        input_ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id if messages[-1]["role"] == "assistant" else IGNORE_INDEX)
    return _lm(input_ids, labels, max_len)
