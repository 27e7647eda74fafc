"""model.task seq2seq-lm: a tiny BART and a tiny T5 (made from configs, word-level tokenizer, no hub) trained
through the real trainer on the demo's learnable summarisation set (short texts; the summary is who did what
when, the place and the reason left out)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from finetune_trainer.collate import IGNORE_INDEX, label_tokens
from finetune_trainer.data.tokenize import tokenize_batch
from finetune_trainer.seq2seq import Seq2SeqCollator, split_row
from finetune_devcluster.assets import build_tiny_seq2seq, summary_rows
from helpers_assets import WORDS, checkpoint_state, deep_update, run_trainer, write_config, write_jsonl

pytestmark = pytest.mark.slow

SUMMARY_TOKENS = 6  # 'baker sold apples on monday' + EOS


def build_tiny_bart(dest: Path) -> Path:
    return build_tiny_seq2seq(dest, "bart")


def build_tiny_t5(dest: Path) -> Path:
    return build_tiny_seq2seq(dest, "t5")


def _tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return tok, tok.get_vocab()


@pytest.fixture(scope="module")
def bart_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_bart(tmp_path_factory.mktemp("bart") / "tiny-bart")


@pytest.fixture(scope="module")
def s2s_assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("seq2seq-assets")
    return {
        "bart": str(build_tiny_bart(root / "tiny-bart")),
        "t5": str(build_tiny_t5(root / "tiny-t5")),
        "data": write_jsonl(root / "summaries.jsonl", summary_rows(200)),
    }


def s2s_spec(assets: dict[str, str], model: str, output_uri: str, **overrides) -> dict:
    spec = {
        "model": {"uri": assets[model], "task": "seq2seq-lm"},
        "method": "full",
        "dataset": {
            "train": assets["data"], "format": "prompt-completion", "split": {"validation": 0.1, "test": 0.1},
            "leakageCheck": "off", "preprocessing": {"dedupe": {"exact": False, "near": False}, "redactPii": False},
        },
        "hyperparameters": {"maxSteps": 40, "learningRate": 0.003, "batchSize": 8, "gradientAccumulationSteps": 2,
                            "maxSeqLength": 32, "warmupRatio": 0.0, "lrScheduler": "linear", "seed": 7, "packing": False},
        "evaluation": {"strategy": "steps", "everySteps": 20, "calibration": False, "metrics": ["bleu", "rouge"],
                       "generation": {"maxNewTokens": 8}},
        "checkpoint": {"everySteps": 10, "keepLast": 5},
        "output": {"uri": output_uri},
    }
    return deep_update(spec, overrides)


def _progress(out: Path) -> dict:
    return json.loads((out / "progress.json").read_text())


# ------------------------------------------------------------------------------------------ pure pieces


def test_rows_are_stored_as_source_then_target_each_cut_on_its_own(bart_dir):
    tok, vocab = _tokenizer(bart_dir)
    long_prompt = "summarise : " + " ".join(WORDS[:10])
    rows = tokenize_batch([{"prompt": long_prompt, "completion": "w0 w1 w2 w3 w4 w5 w6 w7"}], "prompt-completion", tok, 8, seq2seq=True)
    (row,) = rows
    source, target = split_row(row.input_ids, row.labels)
    # The source keeps its closing <eos> (the tokenizer truncates it), the target is cut at the end like a causal LM's row.
    assert source == [vocab["summarise"], vocab[":"]] + [vocab[w] for w in WORDS[:5]] + [vocab["<eos>"]]
    assert target == [vocab[w] for w in WORDS[:8]]
    assert row.truncated and row.length == 13 + 9
    # A causal LM's row of the same record is one sequence cut at 8 tokens: the completion is lost entirely.
    (causal,) = tokenize_batch([{"prompt": long_prompt, "completion": "w0"}], "prompt-completion", tok, 8)
    assert all(label == IGNORE_INDEX for label in causal.labels)


def test_the_collator_pads_source_and_target_and_shifts_the_decoder_inputs(bart_dir):
    from transformers import AutoModelForSeq2SeqLM

    bart = AutoModelForSeq2SeqLM.from_pretrained(bart_dir)
    tok, vocab = _tokenizer(bart_dir)
    rows = [
        {"input_ids": [10, 11, 12, 3, 20, 21, 3], "labels": [-100, -100, -100, -100, 20, 21, 3]},
        {"input_ids": [10, 3, 22, 3], "labels": [-100, -100, 22, 3]},
    ]
    batch = Seq2SeqCollator(vocab["<pad>"], bart.prepare_decoder_input_ids_from_labels)(rows)
    pad, eos = vocab["<pad>"], vocab["<eos>"]
    assert batch["input_ids"].tolist() == [[10, 11, 12, 3], [10, 3, pad, pad]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[20, 21, 3], [22, 3, -100]]
    assert batch["decoder_input_ids"].tolist() == [[eos, 20, 21], [eos, 22, 3]]  # decoder_start_token_id = </s>, -100 -> pad
    assert label_tokens(batch, shift=False) == 5  # every target token is scored (no causal shift)
    # The loss the trainer computes equals the model's own loss on the same batch.
    from finetune_trainer.loss import WindowLoss

    bart.eval()
    ours = WindowLoss(False, shift=False)(bart, batch, denominator=5.0)
    theirs = bart(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_rouge_1_2_and_l_are_scored_when_asked_for():
    from finetune_trainer.generation import score_texts

    scores = score_texts(["baker sold lamps at dawn"], ["baker sold apples at dawn"], metrics=["rouge"],
                         rouge_types=("rouge1", "rouge2", "rougeL"))
    # 4 of 5 words shared; bigrams shared: "baker sold", "at dawn" = 2 of 4; longest common subsequence: 4 words.
    assert scores["rouge_1"] == pytest.approx(0.8) and scores["rouge_2"] == pytest.approx(0.5) and scores["rouge_l"] == pytest.approx(0.8)
    assert set(score_texts(["a b"], ["a b"], metrics=["rouge"])) == {"generation_samples", "rouge_l"}  # causal LM: ROUGE-L alone


# ------------------------------------------------------------------------------------ the real trainer


def test_bart_full_fine_tune_beats_its_baseline_and_exports_a_reloadable_model(s2s_assets, tmp_path):
    out = tmp_path / "out"
    spec = s2s_spec(s2s_assets, "bart", str(out), hyperparameters={"maxSteps": 100, "learningRate": 0.005},
                    evaluation={"everySteps": 50}, checkpoint={"everySteps": 50})
    r = run_trainer(write_config(tmp_path / "job.yaml", spec, name="tiny-bart"), tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    progress = _progress(out)
    assert progress["stage"] == "done" and progress["step"] == progress["totalSteps"] == 100
    baseline, test = progress["evaluation"]["baseline"], progress["evaluation"]["test"]
    start = baseline["base_model"]
    # The baseline is the base model on the same 20 test rows; no k-shot baseline for an encoder-decoder.
    assert (baseline["split"], baseline["reference"], set(baseline["descriptions"])) == ("test", "base_model", {"base_model"})
    assert test["generation_samples"] == start["generation_samples"] == 20
    assert test["eval_tokens"] == start["eval_tokens"] == 20 * SUMMARY_TOKENS  # the loss is on the target tokens only
    print("baseline", start, "test", test)
    # Loss on the target tokens falls, and ROUGE-1/2/L and BLEU of the generated summaries rise far over the base model's.
    assert start["eval_loss"] > 3.0 and test["eval_loss"] < 1.0
    assert start["rouge_l"] < 0.1 and test["rouge_l"] > 0.8 and test["rouge_1"] > 0.8 and test["rouge_2"] > 0.6
    assert start["bleu"] < 5 and test["bleu"] > 50
    gain = progress["gain"]
    assert (gain["metric"], gain["split"], gain["baselineKind"]) == ("eval_loss", "test", "base_model")
    assert gain["final"] == test["eval_loss"] and gain["baseline"] == start["eval_loss"]
    evals = checkpoint_state(out, 100)["evals"]
    assert [e["step"] for e in evals] == [50, 100] and all({"rouge_1", "rouge_2", "rouge_l", "bleu"} <= set(e) for e in evals)

    model_dir = out / "model"
    card = json.loads((model_dir / "model_card.json").read_text())
    assert card["task"] == "seq2seq-lm"
    readme = (model_dir / "README.md").read_text()
    assert "pipeline_tag: text2text-generation" in readme and "ROUGE-2 F1" in readme and "sequence-to-sequence" in readme
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from finetune_trainer.generation import generate_greedy

    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    source = tok("summarise : the baker sold lamps at dawn near the river for the winter .")["input_ids"]
    print(generate_greedy(model, tok, [source], max_new_tokens=8), generate_greedy(model, tok, [source], max_new_tokens=8, num_beams=3))
    greedy, beams = (generate_greedy(model, tok, [source], max_new_tokens=8, num_beams=n)[0].split() for n in (1, 3))
    assert greedy[:3] == beams[:3] == ["baker", "sold", "lamps"]


def test_t5_lora_trains_the_t5_projections_and_exports_an_adapter_and_a_merged_model(s2s_assets, tmp_path):
    out = tmp_path / "out"
    spec = s2s_spec(s2s_assets, "t5", str(out), method="lora", lora={"r": 8, "alpha": 16, "dropout": 0.0},
                    hyperparameters={"maxSteps": 30, "learningRate": 0.02}, evaluation={"everySteps": 30, "metrics": ["rouge"]},
                    checkpoint={"everySteps": 30}, output={"mergeAdapter": True})
    r = run_trainer(write_config(tmp_path / "job.yaml", spec, name="tiny-t5"), tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    progress = _progress(out)
    start, test = progress["evaluation"]["baseline"]["base_model"], progress["evaluation"]["test"]
    assert test["eval_loss"] < start["eval_loss"] - 0.5
    assert {"rouge_1", "rouge_2", "rouge_l"} <= set(test) and "bleu" not in test

    model_dir = out / "model"
    adapter = json.loads((model_dir / "adapter_config.json").read_text())
    assert adapter["task_type"] == "SEQ_2_SEQ_LM" and set(adapter["target_modules"]) == {"q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo"}
    from peft import PeftModel
    from transformers import AutoModelForSeq2SeqLM

    tuned = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(s2s_assets["t5"]), str(model_dir)).eval()
    merged = AutoModelForSeq2SeqLM.from_pretrained(model_dir / "merged").eval()
    base = AutoModelForSeq2SeqLM.from_pretrained(s2s_assets["t5"]).eval()
    ids = torch.tensor([[4, 5, 10, 11, 12, 13, 14, 3]])
    decoder = torch.tensor([[0, 10, 11, 12]])
    with torch.no_grad():
        a, m, b = (x(input_ids=ids, decoder_input_ids=decoder).logits for x in (tuned, merged, base))
    assert torch.allclose(a, m, atol=1e-4) and not torch.allclose(a, b, atol=1e-3)


def test_a_killed_seq2seq_run_resumes_exactly(s2s_assets, tmp_path):
    """kill -9 after the step-4 checkpoint, run again: the per-step losses equal an uninterrupted run's (BART's dropout
    is on, so every RNG stream must come back too)."""
    import signal

    from test_resume import _losses, _resumed_step, _start, _wait_for

    def spec(out):
        return s2s_spec(s2s_assets, "bart", str(out), hyperparameters={"maxSteps": 8}, evaluation={"everySteps": 4, "metrics": None},
                        checkpoint={"everySteps": 4})

    ref = tmp_path / "reference"
    ref.mkdir()
    r = run_trainer(write_config(ref / "job.yaml", spec(ref / "out")), ref)
    assert r.returncode == 0, r.stderr[-3000:]
    reference = _losses(checkpoint_state(ref / "out", 8))
    assert [s for s, _ in reference] == list(range(1, 9))

    out = tmp_path / "out"
    config = write_config(tmp_path / "job.yaml", spec(out))
    proc = _start(config, tmp_path, sleep=0.3)
    _wait_for(out / "checkpoints" / "step-00000004" / "manifest.json", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    r = run_trainer(config, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert 4 <= _resumed_step(r.stderr) < 8
    assert _losses(checkpoint_state(out, 8)) == reference


def test_a_decoder_only_model_is_refused_for_seq2seq_with_what_to_change(tmp_path):
    from finetune_api.spec import parse_spec
    from finetune_trainer.errors import InvalidConfig
    from finetune_trainer.model import load_model
    from helpers_assets import build_tiny_llama

    llama = build_tiny_llama(tmp_path / "llama")
    spec = parse_spec({"model": {"uri": str(llama), "task": "seq2seq-lm"}, "method": "full", "hyperparameters": {"packing": False},
                       "dataset": {"train": "/data/x.jsonl", "format": "prompt-completion"}, "output": {"uri": "/out/x"}})
    with pytest.raises(InvalidConfig, match="needs an encoder-decoder model .* is a llama decoder-only model: use model.task causal-lm"):
        load_model(str(llama), spec)
