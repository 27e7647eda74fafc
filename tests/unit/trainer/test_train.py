"""End-to-end runs of the trainer on CPU with real models: a tiny Llama (prompt-completion, LoRA) and
the pretrained MiniLM BERT (sentiment classification)."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from safetensors.torch import load_file

from finetune_trainer.checkpoint import sha256_file
from helpers_assets import assets, checkpoint_state, lm_spec, run_trainer, write_config  # noqa: F401

pytestmark = pytest.mark.slow


def _progress(out):
    return json.loads((out / "progress.json").read_text())


def test_causal_lm_lora_writes_model_progress_and_verified_checkpoints(assets, tmp_path):
    out = tmp_path / "out"
    spec = lm_spec(assets, str(out), hyperparameters={"maxSteps": 12, "learningRate": 0.02}, output={"mergeAdapter": True},
                   evaluation={"metrics": ["bleu", "rouge"],
                               "retention": {"dataset": assets["lm_data"], "maxLossIncrease": 0.5, "action": "warn"}})
    r = run_trainer(write_config(tmp_path / "job.yaml", spec, name="tiny-lm"), tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]

    # Checkpoints every 3 steps, keepLast 2 (no early stopping, so no extra "best" one).
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["step-00000009", "step-00000012"]
    for name in ckpts:
        manifest = json.loads((out / "checkpoints" / name / "manifest.json").read_text())
        on_disk = {p.name for p in (out / "checkpoints" / name).iterdir()} - {"manifest.json"}
        assert set(manifest["files"]) == on_disk == {
            "adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state_rank0.pt", "trainer_state.json"}
        for fname, meta in manifest["files"].items():
            path = out / "checkpoints" / name / fname
            assert path.stat().st_size == meta["size"] and sha256_file(path) == meta["sha256"]
    state = checkpoint_state(out, 12)
    assert [h["step"] for h in state["history"]] == list(range(1, 13))
    # 128 train rows / batch 4 = 32 micro-batches per epoch; 12 steps x 2 accumulation = 24 consumed.
    assert (state["epoch"], state["batch"]) == (0, 24)
    assert [e["step"] for e in state["evals"]] == [4, 8, 12]

    progress = _progress(out)
    assert progress["stage"] == "done"
    assert progress["step"] == progress["totalSteps"] == 12
    # Contract with the operator: the document parses and projects into the FineTuneJob status.
    from finetune_api.status import ProgressDocument
    from finetune_operator.progress import project

    status = project(ProgressDocument.model_validate(progress))
    assert status["progress"]["text"] == "12/12 (100.0%)" and status["modelUri"] == str(out / "model")
    assert status["gain"]["metric"] == "eval_loss" and [c["step"] for c in status["checkpoints"]] == [9, 12]
    assert progress["modelUri"] == str(out / "model")
    assert progress["latestCheckpoint"] == str(out / "checkpoints" / "step-00000012")
    assert [c["step"] for c in progress["checkpoints"]] == [9, 12]
    assert progress["data"]["rowsRead"] == 160 and progress["data"]["reportUri"] == str(out / "data-report.json")
    assert json.loads((out / "data-report.json").read_text())
    gain = progress["gain"]
    assert gain["metric"] == "eval_loss" and gain["final"] < gain["baseline"] - 0.1
    test = progress["evaluation"]["test"]
    assert test["eval_loss"] > 0 and test["generation_samples"] == 16  # greedy completions of the 16 test prompts
    assert 0 <= test["bleu"] <= 100 and 0 <= test["rouge_l"] <= 1
    # The gain is test vs test: the base model was measured on the test set before training (validation chose the checkpoint).
    baseline = progress["evaluation"]["baseline"]
    assert (gain["split"], gain["baselineKind"], baseline["split"], baseline["reference"]) == ("test", "base_model", "test", "base_model")
    assert gain["final"] == test["eval_loss"] and gain["baseline"] == baseline["base_model"]["eval_loss"]
    assert baseline["base_model"]["generation_samples"] == 16 and "bleu" in baseline["base_model"]
    # The k-shot baseline: the base model shown 4 training rows (seed 7) before each of the same 16 test prompts.
    assert baseline["k"] == 4 and len(set(baseline["k_shot_train_rows"])) == 4
    assert baseline["k_shot"]["generation_samples"] == 16 and {"bleu", "rouge_l"} <= set(baseline["k_shot"])
    assert set(baseline["descriptions"]) == {"base_model", "k_shot"}

    model = out / "model"
    for f in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "model_card.json", "README.md"):
        assert (model / f).exists(), f
    adapter = load_file(str(model / "adapter_model.safetensors"))
    lora_b = [t for n, t in adapter.items() if "lora_B" in n]
    assert lora_b and all(float(t.abs().sum()) > 0 for t in lora_b)  # LoRA B starts at zero: training moved it
    # The exported adapter is the final checkpoint's weights.
    ckpt = load_file(str(out / "checkpoints" / "step-00000012" / "adapter_model.safetensors"))
    layer = "base_model.model.model.layers.1.mlp.down_proj.lora_B"
    assert torch.equal(adapter[f"{layer}.weight"], ckpt[f"{layer}.default.weight"])

    # Retention: the same loss measured on the base model (before) and the fine-tuned one (after).
    retention = progress["evaluation"]["retention"]
    assert retention["loss_after"] < retention["loss_before"] and retention["passed"] is True

    # mergeAdapter: a plain transformers model whose logits equal base + adapter.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(str(model / "merged")).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(assets["llama"]), str(model)).eval()
    ids = torch.tensor([[2, 4, 5, 6, 10, 11, 12]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, with_adapter(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
        base = AutoModelForCausalLM.from_pretrained(assets["llama"]).eval()(input_ids=ids).logits
    assert not torch.allclose(base, merged(input_ids=ids).logits, atol=1e-3)


def test_minilm_classification_beats_its_baseline_on_held_out_data(assets, tmp_path):
    out = tmp_path / "out"
    spec = {
        "model": {"uri": assets["minilm"], "task": "sequence-classification"},
        "method": "lora",
        "dataset": {"train": assets["sentiment"], "format": "classification", "split": {"validation": 0.2, "test": 0.2},
                    "leakageCheck": "off", "preprocessing": {"dedupe": {"near": False}, "redactPii": False, "classWeights": True}},
        "hyperparameters": {"epochs": 2, "learningRate": 0.002, "batchSize": 16, "maxSeqLength": 32, "warmupRatio": 0.0, "seed": 3},
        "evaluation": {"strategy": "epoch"},
        "checkpoint": {"everySteps": 100},
        "output": {"uri": str(out)},
    }
    r = run_trainer(write_config(tmp_path / "job.yaml", spec, name="sentiment"), tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    progress = _progress(out)
    ev = progress["evaluation"]
    # Base encoder + untrained head is a coin flip (named random_head, not "base model"); so is always answering the
    # majority class. A linear probe on the frozen encoder's features is the fair baseline, and it is far better.
    baseline = ev["baseline"]
    assert baseline["split"] == "test" and baseline["reference"] == "random_head" and "base_model" not in baseline
    assert baseline["random_head"]["accuracy"] < 0.7 and baseline["majority_class"]["accuracy"] < 0.7
    assert baseline["linear_probe"]["accuracy"] > baseline["random_head"]["accuracy"] + 0.2
    assert baseline["random_head"]["eval_samples"] == baseline["linear_probe"]["eval_samples"] == 48  # all on the test set
    assert set(baseline["descriptions"]) == {"random_head", "majority_class", "linear_probe"}
    assert ev["test"]["accuracy"] >= 0.9  # the held-out test split, evaluated once with the final model
    assert ev["test"]["eval_samples"] == 48
    gain = progress["gain"]
    assert (gain["metric"], gain["split"], gain["baselineKind"]) == ("accuracy", "test", "random_head")
    assert gain["final"] == ev["test"]["accuracy"] and gain["baseline"] == baseline["random_head"]["accuracy"]
    assert gain["final"] - gain["baseline"] > 0.3
    cal = ev["calibration"]
    assert 0 < cal["temperature"] and cal["ece_after"] <= cal["ece_before"]
    assert cal["test_ece_before"] >= 0 and cal["test_ece_after"] == pytest.approx(ev["test"]["ece"])  # test ECE, before and after T
    card = json.loads((out / "model" / "model_card.json").read_text())
    assert card["evaluation"]["gainFrom"] == "random_head" and "linear_probe" in card["evaluation"]["baselines"]
    assert "Linear probe (test)" in (out / "model" / "README.md").read_text()
    config = json.loads((out / "model" / "adapter_config.json").read_text())
    assert "classifier" in (config.get("modules_to_save") or [])  # the new head is trained in full


def test_early_stopping_on_a_diverging_run_keeps_and_uses_the_best_checkpoint(assets, tmp_path):
    out = tmp_path / "out"
    spec = lm_spec(assets, str(out), method="full", lora=None,
                   hyperparameters={"maxSteps": 30, "learningRate": 1.0, "lrScheduler": "constant", "maxGradNorm": 100.0},
                   evaluation={"everySteps": 1, "earlyStopping": {"metric": "eval_loss", "mode": "min", "patience": 2}},
                   checkpoint={"everySteps": 100, "keepLast": 1})
    r = run_trainer(write_config(tmp_path / "job.yaml", spec), tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    progress = _progress(out)
    stopped = progress["step"]
    assert stopped < 30
    state = checkpoint_state(out, stopped)
    assert state["stopped_early"] is True
    evals = [e["eval_loss"] for e in state["evals"]]
    best = min(evals)
    best_step = state["evals"][evals.index(best)]["step"]
    assert best_step < stopped and all(e >= best for e in evals[evals.index(best) + 1:])
    assert state["best_step"] == best_step and progress["bestMetric"] == pytest.approx(best)
    # keepLast 1 keeps the newest checkpoint plus the best one.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [f"step-{best_step:08d}", f"step-{stopped:08d}"]
    # The exported model is the best checkpoint, not the diverged last one.
    assert progress["evaluation"]["final"]["eval_loss"] == pytest.approx(best, rel=1e-5)
    assert not math.isclose(progress["evaluation"]["final"]["eval_loss"], evals[-1], rel_tol=1e-3)
    final = load_file(str(out / "model" / "model.safetensors"))
    best_ckpt = load_file(str(out / "checkpoints" / f"step-{best_step:08d}" / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(final[name], best_ckpt[name])


def test_best_model_is_used_without_early_stopping_and_bleu_is_scored_at_every_evaluation(assets, tmp_path):
    """useBestModel (default) keeps and exports the best evaluation's weights; off, the last step's are kept."""
    results = {}
    for use_best in (True, False):
        out = tmp_path / f"best-{use_best}"
        spec = lm_spec(assets, str(out), method="full", lora=None,
                       hyperparameters={"maxSteps": 8, "learningRate": 1.0, "lrScheduler": "constant", "maxGradNorm": 100.0},
                       evaluation={"everySteps": 1, "metrics": ["bleu"], "useBestModel": use_best},
                       checkpoint={"everySteps": 100, "keepLast": 1})
        r = run_trainer(write_config(tmp_path / f"job-{use_best}.yaml", spec), tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
        results[use_best] = (out, checkpoint_state(out, 8), _progress(out), r.stderr)

    out, state, progress, log = results[True]
    assert len(state["evals"]) == 8 and all("bleu" in e for e in state["evals"])  # BLEU at every evaluation
    # 8 evaluations on validation prompts + the test set, and before training the base model on the same test
    # prompts, zero-shot and 4-shot (the baselines).
    assert log.count("generation metrics on") == 11 and log.count("test prompts (4-shot)") == 1
    evals = [e["eval_loss"] for e in state["evals"]]
    best_step = state["evals"][evals.index(min(evals))]["step"]
    assert best_step < 8 and state["best_step"] == best_step  # the run diverges after its best step
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [f"step-{best_step:08d}", "step-00000008"]
    assert progress["evaluation"]["final"]["eval_loss"] == pytest.approx(min(evals), rel=1e-5)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(load_file(str(out / "model" / "model.safetensors"))[name],
                       load_file(str(out / "checkpoints" / f"step-{best_step:08d}" / "model.safetensors"))[name])

    out, state, progress, _ = results[False]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000008"]  # no best kept
    assert progress["evaluation"]["final"]["eval_loss"] == pytest.approx(state["evals"][-1]["eval_loss"], rel=1e-5)


def test_checkpoint_upload_runs_in_the_background_while_training_goes_on(assets, tmp_path):
    out = tmp_path / "out"
    spec = lm_spec(assets, str(out), hyperparameters={"maxSteps": 6}, checkpoint={"everySteps": 2, "keepLast": 5},
                   evaluation={"everySteps": 100, "useBestModel": False})
    r = run_trainer(write_config(tmp_path / "job.yaml", spec), tmp_path, FT_TEST_UPLOAD_SLEEP="1.5")
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stderr.splitlines()
    at = lambda pattern: next(i for i, line in enumerate(lines) if re.search(pattern, line))  # noqa: E731
    # Step 3 was trained while step 2's upload was still sleeping: the upload did not stall the loop.
    assert at(r"upload of step 2 paused") < at(r"step 3/6 ") < at(r"checkpoint \S+step-00000002 complete")
    assert [c.name for c in sorted((out / "checkpoints").iterdir())] == ["step-00000002", "step-00000004", "step-00000006"]
    assert all((out / "checkpoints" / c / "manifest.json").exists() for c in ("step-00000002", "step-00000004", "step-00000006"))


@pytest.mark.parametrize("action", ["warn", "fail"])
def test_retention_past_its_threshold_warns_or_fails_the_run(assets, tmp_path, action):
    """A full fine-tune at a high learning rate forgets the retention set; 0.1% is the allowed rise."""
    from finetune_trainer.errors import RetentionExceeded

    out = tmp_path / "out"
    spec = lm_spec(assets, str(out), method="full", lora=None,
                   hyperparameters={"maxSteps": 4, "learningRate": 1.0, "lrScheduler": "constant", "maxGradNorm": 100.0},
                   evaluation={"everySteps": 100, "useBestModel": False, "baseline": False,
                               "retention": {"dataset": assets["lm_data"], "maxLossIncrease": 0.001, "action": action}})
    r = run_trainer(write_config(tmp_path / "job.yaml", spec), tmp_path)
    if action == "fail":
        assert r.returncode == RetentionExceeded.exit_code, r.stderr[-3000:]
        line = (tmp_path / "termination-log").read_text()
        assert line.startswith("RetentionExceeded: loss on the retention set rose from") and line.count("\n") == 1
        assert not (out / "model").exists()  # a model that forgot is not published
    else:
        assert r.returncode == 0, r.stderr[-3000:]
        assert "retention check failed" in r.stderr
        retention = _progress(out)["evaluation"]["retention"]
        assert retention["passed"] is False and retention["loss_after"] > retention["loss_before"] * 1.001
        card = json.loads((out / "model" / "model_card.json").read_text())
        assert '"passed": false' in json.dumps(card)


@pytest.mark.parametrize("fmt", ["text", "chat"])
def test_text_and_chat_formats_train_end_to_end(assets, tmp_path, fmt):
    """The two formats the other tests only tokenise: a short LoRA run on each learns (eval loss falls)."""
    import shutil

    from helpers_assets import lm_rows, write_jsonl

    model = assets["llama"]
    if fmt == "chat":
        rows = [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]} for r in lm_rows(160)]
        model = str(tmp_path / "chat-llama")
        shutil.copytree(assets["llama"], model)
        config = json.loads((tmp_path / "chat-llama" / "tokenizer_config.json").read_text())
        config["chat_template"] = "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} <eos> {% endfor %}"
        (tmp_path / "chat-llama" / "tokenizer_config.json").write_text(json.dumps(config))
    else:
        rows = [{"text": f"{r['prompt']} {r['completion']}"} for r in lm_rows(160)]
    out = tmp_path / "out"
    spec = lm_spec(assets, str(out), model={"uri": model},
                   dataset={"train": write_jsonl(tmp_path / f"{fmt}.jsonl", rows), "format": fmt},
                   hyperparameters={"maxSteps": 8}, evaluation={"everySteps": 8, "metrics": ["rouge"] if fmt == "chat" else None})
    r = run_trainer(write_config(tmp_path / "job.yaml", spec), tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    progress = _progress(out)
    assert progress["stage"] == "done" and progress["step"] == 8
    if fmt == "chat":  # ROUGE-L of the templated prompts, for the fine-tuned model and the zero- and k-shot base model
        baseline = progress["evaluation"]["baseline"]
        assert {"rouge_l", "generation_samples"} <= set(progress["evaluation"]["test"]) & set(baseline["base_model"]) & set(baseline["k_shot"])
    # Test vs test: the base model before training and the fine-tuned one, on the same held-out rows.
    assert progress["evaluation"]["test"]["eval_loss"] < progress["evaluation"]["baseline"]["base_model"]["eval_loss"]
    report = json.loads((out / "data-report.json").read_text())
    assert report["format"] == fmt and report["final_sizes"]["train"] > 100


def test_accumulation_and_packing_do_not_change_the_optimisation(assets, tmp_path):
    """One packed batch of 8 rows == two padded micro-batches of 4 accumulated: every loss token weighs the same."""
    histories = []
    for name, hp in (("packed", {"batchSize": 8, "gradientAccumulationSteps": 1, "packing": True}),
                     ("padded", {"batchSize": 4, "gradientAccumulationSteps": 2, "packing": False})):
        out = tmp_path / name
        spec = lm_spec(assets, str(out), lora={"dropout": 0.0}, checkpoint={"everySteps": 100},
                       hyperparameters={"maxSteps": 5, "dropout": 0.0, **hp})
        r = run_trainer(write_config(tmp_path / f"{name}.yaml", spec), tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
        histories.append([h["loss"] for h in checkpoint_state(out, 5)["history"]])
        if name == "packed":  # without flash-attn: per-document SDPA, checked at start-up
            assert "attention sdpa_per_document" in r.stderr and "packing check: packed and unpacked logits agree" in r.stderr
    packed, padded = histories
    assert packed == pytest.approx(padded, rel=1e-5, abs=1e-6)
    assert packed[-1] < packed[0] - 0.1  # and it does train


def test_a_model_that_attends_across_packed_rows_fails_at_start_up(assets, tmp_path):
    """The start-up check runs on the loaded model before training: a kernel that ignores the row
    boundaries fails the job with InvalidConfig, and packing: false trains the same model."""
    from finetune_trainer.errors import InvalidConfig

    out = tmp_path / "out"
    spec = lm_spec(assets, str(out), hyperparameters={"maxSteps": 1}, evaluation={"baseline": False})
    r = run_trainer(write_config(tmp_path / "job.yaml", spec), tmp_path, FT_TEST_LEAKY_ATTENTION="1")
    assert r.returncode == InvalidConfig.exit_code, r.stderr[-3000:]
    message = (tmp_path / "termination-log").read_text()
    assert message.startswith("InvalidConfig: hyperparameters.packing: ") and "attends across packed rows" in message
    assert "set packing: false" in message.lower()
    assert not (out / "checkpoints").exists()  # failed before the first step

    spec["hyperparameters"]["packing"] = False
    r = run_trainer(write_config(tmp_path / "job.yaml", spec), tmp_path, FT_TEST_LEAKY_ATTENTION="1")
    assert r.returncode == 0, r.stderr[-3000:]


def test_weighted_classification_loss_is_the_weighted_mean_over_the_whole_window():
    from types import SimpleNamespace

    import torch.nn.functional as F

    from finetune_trainer.loss import WindowLoss

    torch.manual_seed(0)
    logits, labels = torch.randn(7, 3), torch.tensor([0, 1, 2, 2, 1, 0, 2])
    model = lambda input_ids, **_: SimpleNamespace(logits=logits[input_ids])  # noqa: E731
    window = [{"input_ids": torch.arange(0, 4), "labels": labels[:4]}, {"input_ids": torch.arange(4, 7), "labels": labels[4:]}]
    loss = WindowLoss(classification=True, class_weights=torch.tensor([1.0, 4.0, 0.5]))
    denominator = loss.denominator(window)
    total = sum(loss(model, b, denominator) for b in window)
    torch.testing.assert_close(total, F.cross_entropy(logits, labels, weight=loss.class_weights))
    loss = WindowLoss(classification=True)
    total = sum(loss(model, b, loss.denominator(window)) for b in window)
    torch.testing.assert_close(total, F.cross_entropy(logits, labels))


# ----------------------------------------------------------------------------------------- model.py


def _spec(assets, **overrides):
    from finetune_api.spec import FineTuneJobSpec

    from helpers_assets import deep_update

    base = {"model": {"uri": assets["llama"]}, "dataset": {"train": "/d.jsonl"}, "output": {"uri": "/o"}}
    return FineTuneJobSpec.model_validate(deep_update(base, overrides))


def test_lora_defaults_per_architecture_dora_dropout_and_checkpointing(assets):
    from finetune_trainer.model import load_model, load_tokenizer

    spec = _spec(assets, method="dora", hyperparameters={"dropout": 0.25, "gradientCheckpointing": True})
    loaded = load_model(assets["llama"], spec, tokenizer=load_tokenizer(assets["llama"], spec))
    assert loaded.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    names = [n for n, p in loaded.model.named_parameters() if p.requires_grad]
    assert any("lora_magnitude_vector" in n for n in names)  # DoRA's magnitude vectors
    assert all("lora_" in n for n in names)  # base frozen
    assert {n.split(".")[-4] for n in names if "lora_A" in n} == set(loaded.target_modules)
    assert loaded.model.base_model.model.config.attention_dropout == 0.25
    assert loaded.model.base_model.model.is_activation_checkpointing
    assert loaded.precision == "fp32"
    loaded.model.train()
    ids = torch.tensor([[2, 4, 5, 6, 7]])
    loaded.model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    grads = [p.grad for n, p in loaded.model.named_parameters() if "lora_B" in n]  # A gets none while B is 0
    assert grads and all(g is not None and float(g.abs().sum()) > 0 for g in grads)


def test_bert_classification_head_is_new_and_fully_trainable_under_lora(assets):
    from finetune_trainer.model import load_model, load_tokenizer

    spec = _spec(assets, model={"uri": assets["minilm"], "task": "sequence-classification"}, dataset={"format": "classification"})
    loaded = load_model(assets["minilm"], spec, labels=["neg", "neu", "pos"], tokenizer=load_tokenizer(assets["minilm"], spec))
    config = loaded.model.base_model.model.config
    assert config.num_labels == 3 and config.id2label == {0: "neg", 1: "neu", 2: "pos"} and config.label2id["pos"] == 2
    assert loaded.target_modules == ["query", "key", "value", "dense"]
    trainable = [n for n, p in loaded.model.named_parameters() if p.requires_grad]
    assert any("classifier" in n and "lora" not in n for n in trainable)
    assert not any("word_embeddings" in n for n in trainable)


def test_unknown_architecture_falls_back_to_all_linear():
    from finetune_trainer.model import default_target_modules

    assert default_target_modules("some-new-arch") == "all-linear"
    assert default_target_modules("gpt2") == ["c_attn", "c_proj", "c_fc"]
