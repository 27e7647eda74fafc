"""Sharded full fine-tunes (FSDP2) and resuming on a different number of processes, on CPU (gloo).

FSDP shards parameters, gradients and optimizer state, but the arithmetic is the same data-parallel
step as DDP: the same global batch gives the same losses. Checkpoints are gathered to rank 0 and
written in the same files as DDP writes, so an FSDP run resumes exactly, and its final model is an
ordinary transformers folder.
"""

from __future__ import annotations

import ast
import json
import re
import shutil

import pytest

from helpers_assets import assets, lm_spec, run_trainer, torchrun, write_config  # noqa: F401

pytestmark = pytest.mark.slow


def _torchrun(config, tmp_path) -> str:
    r = torchrun(config, tmp_path)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-4000:]
    return log


def _rank0(pattern: str, log: str) -> list[str]:
    return re.findall(r"\[rank 0\] INFO finetune_trainer\.[\w.]+: " + pattern, log)


def _full_spec(assets, out, strategy: str, **overrides):
    spec = lm_spec(assets, str(out), method="full", lora=None,
                   hyperparameters={"maxSteps": 4, "learningRate": 1e-3, "distributedStrategy": strategy},
                   evaluation={"everySteps": 2, "metrics": ["bleu"]}, checkpoint={"everySteps": 2, "keepLast": 3})
    for k, v in overrides.items():
        spec[k] = v
    return spec


def test_fsdp_full_fine_tune_matches_ddp_resumes_exactly_and_exports_a_plain_model(assets, tmp_path):
    from safetensors.torch import load_file

    ddp_out, fsdp_out = tmp_path / "ddp", tmp_path / "fsdp"
    ddp_log = _torchrun(write_config(tmp_path / "ddp.yaml", _full_spec(assets, ddp_out, "ddp")), tmp_path)
    fsdp_cfg = write_config(tmp_path / "fsdp.yaml", _full_spec(assets, fsdp_out, "fsdp"))
    fsdp_log = _torchrun(fsdp_cfg, tmp_path)
    assert "distributed strategy: fsdp over 2 processes" in fsdp_log
    held = [float(x) for x in re.findall(r"fsdp: this rank holds \d+ of \d+ parameters \(([\d.]+)%\)", fsdp_log)]
    assert len(held) == 2 and all(40 < h < 60 for h in held), held  # each rank holds about half
    # Only rank 0 read the weights from disk; rank 1 built the model on the meta device.
    assert re.findall(r"\[rank (\d)\] INFO finetune_trainer\.model: model built on the meta device", fsdp_log) == ["1"]
    assert "distributed strategy: ddp over 2 processes" in ddp_log

    step = r"step \d+/4 epoch [\d.]+ loss ([\d.]+)"
    ddp_losses, fsdp_losses = [float(x) for x in _rank0(step, ddp_log)], [float(x) for x in _rank0(step, fsdp_log)]
    assert len(fsdp_losses) == 4
    assert fsdp_losses == pytest.approx(ddp_losses, rel=1e-4)  # same data-parallel step, sharded
    evals = r"eval at step \d+: \{'eval_loss': ([\d.]+)"
    assert [float(x) for x in _rank0(evals, fsdp_log)] == pytest.approx([float(x) for x in _rank0(evals, ddp_log)], rel=1e-4)
    # Generation is a chain of forwards, each a collective under FSDP: every rank generates, same scores.
    # Each rank logs the base model's test scores (zero-shot, then 4-shot: the baselines) and the fine-tuned model's.
    on_test = r"\[rank (\d)\] INFO finetune_trainer\.[\w.]+: generation metrics on \d+ test prompts(?: \(4-shot\))?: (.*)"
    bleu = re.findall(on_test, fsdp_log)
    assert sorted(r for r, _ in bleu) == ["0", "0", "0", "1", "1", "1"]
    assert [s for r, s in bleu if r == "0"] == [s for r, s in bleu if r == "1"]
    ddp_bleu = [ast.literal_eval(s) for _, s in re.findall(on_test, ddp_log)]
    assert len(ddp_bleu) == 3  # DDP generates on rank 0 only
    for fsdp_scores, ddp_scores in zip([s for r, s in bleu if r == "0"], ddp_bleu):
        assert ast.literal_eval(fsdp_scores) == pytest.approx(ddp_scores, abs=1.0)
    checksums = re.findall(r"\[rank (\d)\] INFO finetune_trainer\.[\w.]+: final trainable parameter checksum (\S+)", fsdp_log)
    assert len({c for _, c in checksums}) == 1 and len(checksums) == 2  # all-reduced over the shards: one value

    # The checkpoint holds full, unsharded tensors (the same files DDP writes).
    ckpt = fsdp_out / "checkpoints" / "step-00000004"
    fsdp_weights = load_file(str(ckpt / "model.safetensors"))
    ddp_weights = load_file(str(ddp_out / "checkpoints" / "step-00000004" / "model.safetensors"))
    assert set(fsdp_weights) == set(ddp_weights)
    for name, t in ddp_weights.items():
        assert fsdp_weights[name].shape == t.shape
        assert (fsdp_weights[name] - t).abs().max().item() < 1e-4, name

    # Exact resume: lose the last checkpoint, run again, get the same losses and weights.
    shutil.rmtree(ckpt)
    resumed = _torchrun(fsdp_cfg, tmp_path)
    assert _rank0(r"resumed from \S+step-00000002 at step (\d+)", resumed) == ["2"]
    assert [float(x) for x in _rank0(step, resumed)] == fsdp_losses[2:]
    assert re.findall(r"checksum (\S+)", resumed) == [c for _, c in checksums]

    # The final model is a plain transformers folder.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(fsdp_out / "model"))
    assert sum(p.numel() for p in model.parameters()) > 0
    card = json.loads((fsdp_out / "model" / "model_card.json").read_text())
    assert "fsdp" in json.dumps(card)


def test_resume_on_fewer_processes_continues_at_the_same_row_of_the_epoch(assets, tmp_path):
    out = tmp_path / "out"
    # 128 training rows; batch 4 x 2 ranks = 16 micro-batches per epoch, 2 per step: 8 steps per epoch.
    spec = lm_spec(assets, str(out), hyperparameters={"maxSteps": None, "epochs": 1},
                   checkpoint={"everySteps": 3, "keepLast": 3}, evaluation={"useBestModel": False})
    config = write_config(tmp_path / "job.yaml", spec)
    _torchrun(config, tmp_path)
    state3 = json.loads((out / "checkpoints" / "step-00000003" / "trainer_state.json").read_text())
    assert (state3["epoch"], state3["batch"], state3["world_size"]) == (0, 6, 2)  # 48 rows consumed
    for later in ("step-00000006", "step-00000008"):
        shutil.rmtree(out / "checkpoints" / later)

    # The group comes back with one process: 48 rows = 12 of its micro-batches (4 rows); one epoch is
    # 32 micro-batches = 16 steps, 6 of them done in rows, so 10 remain: 13 steps in all.
    r = run_trainer(config, tmp_path)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-4000:]
    assert "world size changed from 2 to 1: data position (epoch 0, micro-batch 6) -> (epoch 0, micro-batch 12), 0 rows repeated; total steps 8 -> 13" in log
    steps = re.findall(r"step (\d+)/13 epoch", log)
    assert steps == [str(s) for s in range(4, 14)]
    final = json.loads((out / "checkpoints" / "step-00000013" / "trainer_state.json").read_text())
    assert (final["epoch"], final["batch"], final["world_size"]) == (1, 0, 1)  # exactly one epoch consumed
    # The LR schedule was rebuilt for the remapped 13 steps (not the 16 of a fresh run on one process).
    import torch
    from finetune_api.spec import Hyperparameters

    from finetune_trainer.optim import build_scheduler

    hp = Hyperparameters.model_validate(spec["hyperparameters"])
    fresh = build_scheduler(torch.optim.AdamW([torch.nn.Parameter(torch.ones(1))], lr=hp.learning_rate), hp, 13)
    expected = {}
    for s in range(1, 14):
        fresh.optimizer.step()
        fresh.step()
        expected[s] = fresh.get_last_lr()[0]
    assert {h["step"]: h["lr"] for h in final["history"] if h["step"] > 3} == pytest.approx({s: expected[s] for s in range(4, 14)})
    assert "rng_state_rank1.pt" not in json.loads((out / "checkpoints" / "step-00000013" / "manifest.json").read_text())["files"]


def test_a_ddp_checkpoint_resumes_under_fsdp(assets, tmp_path):
    """Checkpoints do not depend on the strategy: a run restarted as FSDP continues a DDP run's steps."""
    out = tmp_path / "out"
    ddp_log = _torchrun(write_config(tmp_path / "ddp.yaml", _full_spec(assets, out, "ddp")), tmp_path)
    shutil.rmtree(out / "checkpoints" / "step-00000004")
    fsdp_log = _torchrun(write_config(tmp_path / "fsdp.yaml", _full_spec(assets, out, "fsdp")), tmp_path)
    assert "distributed strategy: fsdp over 2 processes" in fsdp_log
    assert _rank0(r"resumed from \S+step-00000002 at step (\d+)", fsdp_log) == ["2"]
    step = r"step \d+/4 epoch [\d.]+ loss ([\d.]+)"
    ddp_losses = [float(x) for x in _rank0(step, ddp_log)]
    assert [float(x) for x in _rank0(step, fsdp_log)] == pytest.approx(ddp_losses[2:], rel=1e-4)
