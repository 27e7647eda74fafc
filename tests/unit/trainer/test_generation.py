"""Generation metrics on the format the model was trained on: greedy completions of the prompts' own token ids
(chat template and its special tokens included), left-padded batches that generate what each prompt generates
alone, and a seeded (stratified for label-like completions) sample of the evaluated rows."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from finetune_trainer.data.formats import CHAT, PROMPT_COMPLETION
from finetune_trainer.data.tokenize import tokenize_batch
from finetune_trainer.generation import generate_greedy, label_like, prompts_and_references, sample_rows

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WORDS = [f"w{i}" for i in range(40)] + ["user", "assistant", "system", "next", "of", ":"]


def _tokenizer(*, chat: bool = True, pad: bool = True):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    kwargs = {"pad_token": "<pad>"} if pad else {}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                        additional_special_tokens=["<|im_start|>", "<|im_end|>"], **kwargs)
    tokenizer.chat_template = CHATML if chat else None
    return tokenizer


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=6 + len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=128, bos_token_id=2, eos_token_id=3, pad_token_id=1)
    return LlamaForCausalLM(config).eval()


def _chat_rows(tokenizer, n: int = 6) -> list[dict[str, list[int]]]:
    records = [{"messages": [{"role": "system", "content": "w1 w2"}, {"role": "user", "content": " ".join(f"w{(i + j) % 40}" for j in range(2 + i % 3))},
                             {"role": "assistant", "content": f"w{i % 40} w{(i + 5) % 40}"}]} for i in range(n)]
    return [{"input_ids": t.input_ids, "labels": t.labels} for t in tokenize_batch(records, CHAT, tokenizer, 64)], records


def _prefill_inputs(model):
    """The (unpadded) prompt ids of every row of every generate call, read off the model's first forward."""
    seen: list[list[int]] = []

    def hook(module, args, kwargs):
        ids, mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
        if ids is not None and ids.shape[1] > 1:  # the prefill; later steps feed one token
            mask = torch.ones_like(ids) if mask is None else mask  # transformers drops an all-ones mask
            seen.extend([int(t) for t, m in zip(row, row_mask) if m] for row, row_mask in zip(ids, mask))

    return seen, model.register_forward_pre_hook(hook, with_kwargs=True)


def test_generation_is_fed_the_chat_templated_prompt_ids_special_tokens_included(tiny_llama):
    """Before: the prompt was decoded with skip_special_tokens=True and re-tokenised, so <|im_start|>/<|im_end|>
    were gone and the model completed a format it never saw."""
    tokenizer = _tokenizer()
    rows, records = _chat_rows(tokenizer)
    expected = [
        tokenizer(tokenizer.apply_chat_template(r["messages"][:-1], tokenize=False, add_generation_prompt=True),
                  add_special_tokens=False)["input_ids"]
        for r in records
    ]
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert all(e.count(im_start) == 3 for e in expected)  # system, user, and the generation prompt
    # What the old code generated from: the special tokens are lost.
    assert tokenizer(tokenizer.decode(expected[0], skip_special_tokens=True))["input_ids"] != expected[0]

    prompts, references = prompts_and_references(rows, tokenizer)
    assert prompts == expected
    assert references == [r["messages"][-1]["content"] for r in records]

    seen, handle = _prefill_inputs(tiny_llama)
    try:
        generate_greedy(tiny_llama, tokenizer, prompts, max_new_tokens=2, batch_size=4)
    finally:
        handle.remove()
    assert seen == expected


def test_the_evaluator_generates_from_the_prepared_rows_token_ids(tiny_llama):
    """The same through Evaluator.generation_metrics, the path the training loop and the final report take."""
    import datasets
    from accelerate import Accelerator

    from finetune_api.spec import FineTuneJobSpec
    from finetune_trainer.data.prepare import PreparedData
    from finetune_trainer.distributed import DistInfo
    from finetune_trainer.evaluator import Evaluator

    tokenizer = _tokenizer()
    rows, records = _chat_rows(tokenizer, n=10)
    ds = datasets.Dataset.from_list(rows)
    spec = FineTuneJobSpec.model_validate({
        "model": {"uri": "/m"}, "dataset": {"train": "/t.jsonl", "format": "chat"}, "output": {"uri": "/out"},
        "hyperparameters": {"batchSize": 3, "maxSeqLength": 64, "seed": 5}, "evaluation": {"metrics": ["bleu", "rouge"]},
    })
    data = PreparedData(train=ds, validation=ds, test=None, retention=None, labels=None, class_weights=None, report={})
    evaluator = Evaluator(spec, DistInfo(), accelerator=Accelerator(cpu=True), tokenizer=tokenizer, data=data, num_labels=None,
                          model=tiny_llama, sharded=False)
    seen, handle = _prefill_inputs(tiny_llama)
    try:
        scores = evaluator.generation_metrics(ds, limit=4)
    finally:
        handle.remove()
    chosen = sample_rows([r["messages"][-1]["content"] for r in records], 4, seed=5)
    assert scores["generation_samples"] == 4 and {"bleu", "rouge_l"} <= set(scores)
    prompts, _ = prompts_and_references(rows, tokenizer)
    assert seen == [prompts[i] for i in chosen]  # exactly each sampled row's training tokens before its assistant turn
    assert all(s.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 3 for s in seen)


@pytest.mark.parametrize("pad", [True, False])
def test_left_padded_batches_generate_what_each_prompt_generates_alone(tiny_llama, pad):
    tokenizer = _tokenizer(chat=False, pad=pad)
    texts = ["next of : w1 w2 w3 w4 w5 w6 w7", "w9", "next of : w20 w21", "w3 w4 w5 w6", "w30 w31 w32 w33 w34 w35 w36 w37 w38"]
    prompts = [tokenizer(t)["input_ids"] for t in texts]
    alone = [generate_greedy(tiny_llama, tokenizer, [p], max_new_tokens=8, batch_size=1)[0] for p in prompts]
    batched = generate_greedy(tiny_llama, tokenizer, prompts, max_new_tokens=8, batch_size=5)
    assert batched == alone
    assert len(set(alone)) > 1  # the prompts lead somewhere different: padding could have shown
    assert tokenizer.padding_side == "right" and (tokenizer.pad_token is None) == (not pad)  # the tokenizer untouched


def test_generation_needs_a_token_to_pad_with(tiny_llama):
    tokenizer = _tokenizer(chat=False, pad=False)
    tokenizer.eos_token = None
    with pytest.raises(ValueError, match="neither a pad token nor an eos token"):
        generate_greedy(tiny_llama, tokenizer, [[2, 7], [2]], max_new_tokens=2)


# ----------------------------------------------------------------------------------------------- the sample


def test_the_sample_is_seeded_not_the_first_rows():
    references = [f"free text number {i}" for i in range(500)]
    a, b, c = sample_rows(references, 32, seed=1), sample_rows(references, 32, seed=1), sample_rows(references, 32, seed=2)
    assert a == b and a != c
    assert len(a) == len(set(a)) == 32 and a == sorted(a)
    assert a != list(range(32))  # before: the first 32 rows of the file
    assert max(a) > 250  # drawn from the whole set
    assert sample_rows(references[:10], 32, seed=1) == list(range(10))  # fewer rows than asked: all of them


def test_the_sample_of_label_like_completions_is_stratified():
    """A file sorted by label: the first 40 rows are all 'positive'; the sample keeps every label's share."""
    references = ["positive"] * 600 + ["negative"] * 300 + ["neutral"] * 100
    assert label_like(references) and not label_like([f"t{i}" for i in range(100)])
    chosen = sample_rows(references, 40, seed=3)
    counts = Counter(references[i] for i in chosen)
    assert counts == {"positive": 24, "negative": 12, "neutral": 4}
    assert sample_rows(references, 40, seed=3) == chosen and sample_rows(references, 40, seed=4) != chosen
    # Largest remainders: 7 rows of 3 equal labels -> 3, 2, 2 (the extra one to the earliest label).
    three = ["a"] * 10 + ["b"] * 10 + ["c"] * 10
    assert sorted(Counter(three[i] for i in sample_rows(three, 7, seed=0)).values()) == [2, 2, 3]


def test_prompt_completion_rows_keep_their_bos():
    tokenizer = _tokenizer(chat=False)
    tokenizer._tokenizer.post_processor = None
    from tokenizers import processors

    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    rows = [{"input_ids": t.input_ids, "labels": t.labels}
            for t in tokenize_batch([{"prompt": "next of : w1", "completion": "w2"}], PROMPT_COMPLETION, tokenizer, 32)]
    prompts, references = prompts_and_references(rows, tokenizer)
    assert prompts == [[2] + tokenizer("next of : w1", add_special_tokens=False)["input_ids"]] and references == ["w2"]


def test_label_like_completions_are_also_scored_by_label_accuracy():
    """Classification as generation: BLEU/ROUGE of one-word labels say little; the share of exact labels says it."""
    from finetune_trainer.generation import score_texts

    references = ["positive", "negative", "negative", "positive", "negative", "positive"]
    hypotheses = [" Positive", "negative", "positive", "positive  ", "negative it is", "positive"]
    assert score_texts(hypotheses, references)["label_accuracy"] == pytest.approx(4 / 6)
    assert "label_accuracy" not in score_texts(["a b c", "d e"], ["a b c", "d e f"])  # free text: no labels to match
