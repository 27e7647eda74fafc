"""Two processes under torchrun on CPU (gloo): gradients are synchronised, every rank logs the same
all-reduced losses, the replicas end with identical weights, and each rank's RNG is checkpointed."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from helpers_assets import assets, lm_spec, torchrun, write_config  # noqa: F401

pytestmark = pytest.mark.slow


def _per_rank(pattern: str, log: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for rank, value in re.findall(r"\[rank (\d)\] INFO finetune_trainer\.[\w.]+: " + pattern, log):
        out.setdefault(rank, []).append(value)
    return out


def _single_process_baseline(spec, assets) -> float:
    """The base model's test loss (the baselines are measured on test) computed here, in one process, with the same data preparation."""
    from finetune_api.spec import FineTuneJobSpec
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune_trainer.data import prepare_data
    from finetune_trainer.evaluate import evaluate_lm
    from finetune_trainer.storage import Storage
    from finetune_trainer.collate import eval_loader

    parsed = FineTuneJobSpec.model_validate(spec)
    tokenizer = AutoTokenizer.from_pretrained(assets["llama"])
    data = prepare_data(parsed, Storage(), tokenizer)
    model = AutoModelForCausalLM.from_pretrained(assets["llama"])
    loader = eval_loader(data.test, classification=False, batch_size=4, pad_token_id=tokenizer.pad_token_id)
    return evaluate_lm(model, loader)["eval_loss"]


def _torchrun(config, tmp_path) -> str:
    r = torchrun(config, tmp_path, timeout=300)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-4000:]
    return log


def test_two_process_ddp_on_cpu_trains_in_lockstep_and_resumes_on_every_rank(assets, tmp_path):
    out = tmp_path / "out"
    # useBestModel off: only the periodic checkpoints (3, 6), so losing step 6 resumes from step 3.
    spec = lm_spec(assets, str(out), hyperparameters={"maxSteps": 6}, checkpoint={"everySteps": 3, "keepLast": 3},
                   evaluation={"useBestModel": False})
    config = write_config(tmp_path / "job.yaml", spec)
    log = _torchrun(config, tmp_path)

    # The data is prepared once per node: local rank 0 does it, rank 1 maps the same Arrow files.
    assert re.findall(r"\[rank (\d)\] INFO finetune_trainer\.data\.shared: using the data local rank 0 prepared", log) == ["1"]
    losses = _per_rank(r"step \d+/6 epoch [\d.]+ loss ([\d.]+)", log)
    assert set(losses) == {"0", "1"} and len(losses["0"]) == 6
    assert losses["0"] == losses["1"]  # the logged loss is the all-reduced mean
    checksums = _per_rank(r"final trainable parameter checksum (\S+)", log)
    assert checksums["0"] == checksums["1"]  # replicas trained on different rows but stayed identical

    # Evaluation is sharded across the ranks and gathered: both ranks report the single-process numbers.
    baselines = _per_rank(r"baseline: \{'eval_loss': ([\d.]+)", log)
    assert baselines["0"] == baselines["1"]
    assert float(baselines["0"][0]) == pytest.approx(_single_process_baseline(spec, assets), rel=1e-9)
    evals = _per_rank(r"eval at step (\d+: \{'eval_loss': [\d.]+)", log)
    assert evals["0"] == evals["1"] and len(evals["0"]) == 2

    ckpt = out / "checkpoints" / "step-00000006"
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["world_size"] == 2
    rng = {n: m["sha256"] for n, m in manifest["files"].items() if n.startswith("rng_state_rank")}
    assert set(rng) == {"rng_state_rank0.pt", "rng_state_rank1.pt"}
    assert rng["rng_state_rank0.pt"] != rng["rng_state_rank1.pt"]  # each rank has its own dropout stream
    state = json.loads((ckpt / "trainer_state.json").read_text())
    # 128 train rows / (batch 4 x 2 ranks) = 16 micro-batches per epoch; 6 steps x 2 accumulation = 12 consumed.
    assert (state["epoch"], state["batch"]) == (0, 12)
    progress = json.loads((out / "progress.json").read_text())
    assert progress["stage"] == "done" and progress["step"] == 6

    # Lose everything after step 3 (as if the group died then) and run again: both ranks resume from
    # step 3 and recompute steps 4-6 to the same losses and the same final weights.
    shutil.rmtree(ckpt)
    resumed = _torchrun(config, tmp_path)
    assert _per_rank(r"resumed from \S+step-00000003 at step (\d+)", resumed) == {"0": ["3"], "1": ["3"]}
    again = _per_rank(r"step \d+/6 epoch [\d.]+ loss ([\d.]+)", resumed)
    assert again["0"] == again["1"] == losses["0"][3:]
    assert _per_rank(r"final trainable parameter checksum (\S+)", resumed) == checksums


def test_a_data_failure_on_local_rank_0_is_every_ranks_reason(assets, tmp_path):
    """Local rank 0 prepares the data; its user-caused error reaches the other local ranks as the same error."""
    from finetune_trainer.errors import EmptyDataset

    spec = lm_spec(assets, str(tmp_path / "out"), dataset={"preprocessing": {"minTokens": 10_000}})  # every row is too short
    config = write_config(tmp_path / "job.yaml", spec)
    r = torchrun(config, tmp_path, timeout=300)
    log = r.stdout + r.stderr
    assert r.returncode != 0
    codes = re.findall(r"exitcode\s*:\s*(\d+)", log)
    assert codes and set(codes) == {str(EmptyDataset.exit_code)}, log[-3000:]  # both ranks, same code
    assert (tmp_path / "termination-log").read_text().startswith("EmptyDataset: ")
