"""Preference tuning (objective dpo / simpo on dataset.format preference).

Fast tests: the DPO and SimPO losses against the papers' formulas computed independently (plain Python floats),
the response log-probabilities against a hand-rolled log-softmax, and the pair data pipeline (parsing, cleaning,
dedupe, leakage on the prompt, prompt-masked tokenisation). The slow ones train the tiny Llama end to end: DPO (full
fine-tune) raises validation reward accuracy above the base model's implicit preference accuracy, the same run killed
and resumed repeats its losses exactly, and SimPO (reference-free, LoRA) learns too. DPO with LoRA (the adapter
disabled for the reference) runs in tests/integration/test_e2e_preference.py.
"""

from __future__ import annotations

import json
import math
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from finetune_api.spec import FineTuneJobSpec
from finetune_trainer.data import prepare_data
from finetune_trainer.data.preference import key_text, parse, tokenize_pair
from finetune_trainer.data.tokenize import IGNORE_INDEX
from finetune_trainer.errors import LeakageDetected
from finetune_trainer.preference import PairCollator, PreferenceLoss, dpo_loss, sequence_logps, simpo_loss
from finetune_trainer.storage import Storage
from helpers_assets import RUNNER, WORDS, assets, checkpoint_state, run_trainer, trainer_env, write_config, write_jsonl  # noqa: F401
from test_data_pipeline import make_tokenizer


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


# ----------------------------------------------------------------------------------------- the losses


def test_dpo_loss_is_the_papers_formula():
    """Rafailov et al. 2023, eq. 7, on every pair: -log sigmoid(beta * (log-ratio chosen - log-ratio rejected))."""
    pc, pr = [-3.0, -10.0, -2.5, -7.0], [-4.0, -9.0, -2.5, -1.0]
    rc, rr = [-3.5, -9.5, -2.0, -6.0], [-3.0, -9.5, -3.0, -2.0]
    beta = 0.3
    losses, chosen, rejected = dpo_loss(*(torch.tensor(v, dtype=torch.float64) for v in (pc, pr, rc, rr)), beta=beta)
    for i in range(4):
        margin = beta * ((pc[i] - rc[i]) - (pr[i] - rr[i]))
        assert losses[i].item() == pytest.approx(-_log_sigmoid(margin), rel=1e-12)
        assert chosen[i].item() == pytest.approx(beta * (pc[i] - rc[i]))
        assert rejected[i].item() == pytest.approx(beta * (pr[i] - rr[i]))
    # A policy equal to its reference: every reward 0, loss log 2 (why DPO's reward accuracy at step 0 says nothing).
    same = torch.tensor(pc, dtype=torch.float64)
    losses, chosen, rejected = dpo_loss(same, same, same, same, beta=beta)
    assert torch.allclose(losses, torch.full((4,), math.log(2), dtype=torch.float64)) and not (chosen > rejected).any()


def test_simpo_loss_is_the_papers_formula():
    """Meng et al. 2024, eq. 6: -log sigmoid(beta/|y_w| log pi(y_w) - beta/|y_l| log pi(y_l) - gamma), no reference."""
    pc, nc, pr, nr = [-6.0, -2.0, -9.0], [3, 1, 9], [-4.0, -8.0, -3.0], [2, 4, 1]
    beta, gamma = 2.0, 0.7
    losses, chosen, rejected = simpo_loss(torch.tensor(pc, dtype=torch.float64), torch.tensor(nc), torch.tensor(pr, dtype=torch.float64),
                                          torch.tensor(nr), beta=beta, gamma=gamma)
    for i in range(3):
        rw, rl = beta * pc[i] / nc[i], beta * pr[i] / nr[i]
        assert losses[i].item() == pytest.approx(-_log_sigmoid(rw - rl - gamma), rel=1e-12)
        assert (chosen[i].item(), rejected[i].item()) == (pytest.approx(rw), pytest.approx(rl))


def test_response_log_probs_sum_only_the_unmasked_next_tokens():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7, dtype=torch.float64)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 4, 1], [IGNORE_INDEX, 6, 2, IGNORE_INDEX, IGNORE_INDEX]])
    logps, counts = sequence_logps(logits, labels)
    for row in range(2):
        expected = 0.0
        for t in range(1, 5):  # logits at t-1 predict labels[t]
            if labels[row, t] != IGNORE_INDEX:
                z = logits[row, t - 1]
                expected += (z[labels[row, t]] - torch.logsumexp(z, 0)).item()
        assert logps[row].item() == pytest.approx(expected, rel=1e-6)  # scored in float32
    assert counts.tolist() == [3, 2]


class Tiny(torch.nn.Module):
    """A causal toy LM (position t sees tokens <= t), enough to score padded rows."""

    def __init__(self, vocab: int = 11):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, 8)
        self.out = torch.nn.Linear(8, vocab)

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        return type("Out", (), {"logits": self.out(self.emb(input_ids).cumsum(1))})()


def test_the_pair_loss_of_a_batch_is_its_pairs_summed_loss_over_the_window():
    """The model's forward on the 2B padded rows gives the same per-pair loss as scoring each pair's rows alone."""
    torch.manual_seed(0)

    rows = [{"input_ids": [1, 2, 3, 4], "labels": [IGNORE_INDEX, IGNORE_INDEX, 3, 4], "rejected_input_ids": [1, 2, 5],
             "rejected_labels": [IGNORE_INDEX, IGNORE_INDEX, 5], "ref_chosen_logp": -2.0, "ref_rejected_logp": -1.5},
            {"input_ids": [1, 6], "labels": [IGNORE_INDEX, 6], "rejected_input_ids": [1, 7, 8, 9, 2],
             "rejected_labels": [IGNORE_INDEX, 7, 8, 9, 2], "ref_chosen_logp": -3.0, "ref_rejected_logp": -9.0}]
    collate, model = PairCollator(pad_token_id=0), Tiny()
    batch = collate(rows)
    assert batch["input_ids"].shape == (4, 5) and batch["ref_logps"].tolist() == [[-2.0, -1.5], [-3.0, -9.0]]
    loss = PreferenceLoss("dpo", beta=0.5)
    both = loss.terms(model, batch)["loss"]
    alone = torch.cat([loss.terms(model, collate([r]))["loss"] for r in rows])
    assert torch.allclose(both, alone, atol=1e-6)
    assert loss(model, batch, denominator=4.0).item() == pytest.approx(both.sum().item() / 4.0, rel=1e-6)
    assert loss.local_total([batch, collate(rows[:1])]) == 3.0  # pairs, not tokens


def test_evaluation_metrics_are_means_over_pairs_whatever_the_batches():
    import datasets

    from finetune_trainer.preference import eval_loader, evaluate_preference

    torch.manual_seed(1)
    rng = random.Random(0)
    rows = []
    for _ in range(5):
        prompt = [1] + [rng.randrange(2, 11) for _ in range(rng.randint(1, 3))]
        chosen, rejected = [rng.randrange(2, 11) for _ in range(rng.randint(1, 4))], [rng.randrange(2, 11) for _ in range(rng.randint(1, 4))]
        rows.append({"input_ids": prompt + chosen, "labels": [IGNORE_INDEX] * len(prompt) + chosen,
                     "rejected_input_ids": prompt + rejected, "rejected_labels": [IGNORE_INDEX] * len(prompt) + rejected})
    model, loss = Tiny(), PreferenceLoss("simpo", beta=2.0, gamma=0.5)
    per_pair = [loss.terms(model, PairCollator(0)([r])) for r in rows]
    metrics = evaluate_preference(model, eval_loader(datasets.Dataset.from_list(rows), batch_size=2, pad_token_id=0), loss)
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    chosen = [t["chosen_rewards"].item() for t in per_pair]
    rejected = [t["rejected_rewards"].item() for t in per_pair]
    assert metrics["eval_pairs"] == 5
    assert metrics["eval_loss"] == pytest.approx(mean([t["loss"].item() for t in per_pair]), rel=1e-6)
    assert metrics["reward_accuracy"] == pytest.approx(mean([float(c > r) for c, r in zip(chosen, rejected)]))
    assert (metrics["chosen_reward"], metrics["rejected_reward"]) == (pytest.approx(mean(chosen), rel=1e-6), pytest.approx(mean(rejected), rel=1e-6))
    assert metrics["reward_margin"] == pytest.approx(mean(chosen) - mean(rejected), rel=1e-6)
    # SimPO's reward is beta x the mean token log-prob, so the two accuracies agree.
    assert metrics["logp_accuracy"] == metrics["reward_accuracy"]


# ------------------------------------------------------------------------------------------- the data


def _spec(train: str, **dataset) -> FineTuneJobSpec:
    dataset.setdefault("split", {"validation": 0.0, "test": 0.0})
    return FineTuneJobSpec.model_validate({
        "model": {"uri": "/models/base"}, "objective": {"type": "dpo"}, "output": {"uri": "/out"},
        "dataset": {"train": train, "format": "preference", **dataset},
        "hyperparameters": {"maxSeqLength": 64, "packing": False},
    })


def test_pairs_are_parsed_from_text_or_messages_and_bad_rows_say_why():
    from finetune_api.spec import FieldNames

    fields = FieldNames()
    assert parse({"prompt": "what is up", "chosen": "w1", "rejected": "w2"}, fields) == {"prompt": "what is up", "chosen": "w1", "rejected": "w2"}
    conversational = parse({"prompt": [{"role": "user", "content": "hello"}], "chosen": [{"role": "assistant", "content": "w1"}],
                            "rejected": json.dumps([{"role": "assistant", "content": "w2"}])}, fields)
    assert conversational == {"prompt": [{"role": "user", "content": "hello"}], "chosen": "w1", "rejected": "w2"}
    assert parse({"prompt": "p", "chosen": "w1"}, fields) == "missing column 'rejected'"
    assert "list of assistant" in parse({"prompt": "p", "chosen": [{"role": "user", "content": "x"}], "rejected": "w"}, fields)
    custom = FieldNames(prompt="q", chosen="good", rejected="bad")
    assert parse({"q": "p", "good": "w1", "bad": "w2"}, custom) == {"prompt": "p", "chosen": "w1", "rejected": "w2"}


def test_tokenised_pairs_share_the_prompt_and_score_only_the_responses():
    tokenizer = make_tokenizer()
    pair = tokenize_pair({"prompt": "w1 w2 w3", "chosen": "w4 w5", "rejected": "w6"}, tokenizer, max_len=64)
    prompt = tokenizer("w1 w2 w3")["input_ids"]
    eos = tokenizer.eos_token_id
    assert pair.input_ids == prompt + tokenizer("w4 w5", add_special_tokens=False)["input_ids"] + [eos]
    assert pair.rejected_input_ids[: len(prompt)] == prompt and pair.rejected_input_ids[-1] == eos
    assert pair.labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt) and pair.labels[len(prompt):] == pair.input_ids[len(prompt):]
    assert pair.rejected_labels == [IGNORE_INDEX] * len(prompt) + pair.rejected_input_ids[len(prompt):]
    assert pair.trainable == 2  # the shorter response: w6 + EOS
    chat = tokenize_pair({"prompt": [{"role": "user", "content": "hello"}], "chosen": "w1", "rejected": "w2 w3"}, tokenizer, max_len=64)
    head = tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False, add_generation_prompt=True),
                     add_special_tokens=False)["input_ids"]
    assert chat.input_ids[: len(head)] == head == chat.rejected_input_ids[: len(head)]
    assert [t for t in chat.labels if t != IGNORE_INDEX] == chat.input_ids[len(head):]  # w1 <|im_end|> (the template's end of turn)
    # The keys: several pairs for one prompt are not duplicates of each other; leakage compares the prompt.
    a, b = {"prompt": "p", "chosen": "w1", "rejected": "w2"}, {"prompt": "p", "chosen": "w3", "rejected": "w2"}
    assert key_text(a, "turns") != key_text(b, "turns") and key_text(a, "prompt") == key_text(b, "prompt") == "p"


def test_cleaning_dedupe_and_pii_apply_to_pairs(tmp_path):
    rng = random.Random(0)
    rows = []
    for i in range(30):
        prompt = " ".join(rng.choice(WORDS) for _ in range(6)) + f" w{i}"
        rows.append({"prompt": prompt, "chosen": "w1 w2", "rejected": "w3"})
        rows.append({"prompt": prompt, "chosen": "w4 w5", "rejected": "w3"})  # same prompt, other pair: kept
    rows.append(dict(rows[0]))  # an exact copy: dropped
    rows.append({"prompt": "w7 w8", "chosen": "write to ann@example.com", "rejected": "w9"})  # redacted
    rows.append({"prompt": "w7 w9", "chosen": "w1", "rejected": "   "})  # empty response: dropped
    rows.append({"prompt": "w7 w10", "chosen": "w1"})  # malformed
    spec = _spec(write_jsonl(tmp_path / "train.jsonl", rows), preprocessing={"dedupe": {"near": False}, "maxMalformedFraction": 0.1})
    data = prepare_data(spec, Storage(), make_tokenizer(), cache_dir=tmp_path / "cache")
    counts = data.report["inputs"]["train"]
    assert (counts["rows_read"], counts["malformed"], counts["exact_duplicates"], counts["empty"], counts["rows_kept"]) == (64, 1, 1, 1, 61)
    assert counts["pii"]["EMAIL"] == 1
    assert data.train.column_names == ["input_ids", "labels", "rejected_input_ids", "rejected_labels"]
    assert counts["tokens"] == sum(len(r["input_ids"]) + len(r["rejected_input_ids"]) for r in data.train)
    redacted = make_tokenizer().decode(data.train[60]["input_ids"])
    assert "example.com" not in redacted and "EMAIL" in redacted


def test_a_test_prompt_seen_in_train_is_leakage_whatever_its_responses(tmp_path):
    rng = random.Random(1)
    train = [{"prompt": " ".join(rng.choice(WORDS) for _ in range(8)), "chosen": "w1", "rejected": "w2"} for _ in range(20)]
    test = [{"prompt": train[3]["prompt"], "chosen": "w5 w6", "rejected": "w7"},
            {"prompt": " ".join(rng.choice(WORDS) for _ in range(8)), "chosen": "w1", "rejected": "w2"}]
    spec = _spec(write_jsonl(tmp_path / "train.jsonl", train), test=write_jsonl(tmp_path / "test.jsonl", test))
    with pytest.raises(LeakageDetected, match="1 .*test"):
        prepare_data(spec, Storage(), make_tokenizer(), cache_dir=tmp_path / "a")
    dropped = spec.model_copy(update={"dataset": spec.dataset.model_copy(update={"leakage_check": "drop"})})
    data = prepare_data(dropped, Storage(), make_tokenizer(), cache_dir=tmp_path / "b")
    assert len(data.test) == 1 and data.report["leakage"]["key"] == "prompt" and data.report["leakage"]["test"]["dropped"] == 1


# ------------------------------------------------------------------------------------- training runs


def test_the_example_is_a_valid_dpo_job():
    from finetune_trainer.config import load_config

    config = load_config(Path(__file__).resolve().parents[3] / "examples" / "preference-dpo.yaml")
    assert (config.spec.objective_type, config.spec.dataset.format, config.spec.objective.beta) == ("dpo", "preference", 0.3)


def preference_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """prompt 'next of : wA wB ...'; chosen: the successors (as the LM task of helpers_assets), rejected: the predecessors."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        ids = [rng.randrange(len(WORDS)) for _ in range(rng.randint(2, 5))]
        rows.append({"prompt": "next of : " + " ".join(WORDS[i] for i in ids),
                     "chosen": " ".join(WORDS[(i + 1) % len(WORDS)] for i in ids),
                     "rejected": " ".join(WORDS[(i - 1) % len(WORDS)] for i in ids)})
    return rows


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> str:
    return write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", preference_rows(200))


def preference_spec(assets, pairs, out, objective, **overrides):
    spec = {
        "model": {"uri": assets["llama"]}, "method": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.1}, "objective": objective,
        "dataset": {"train": pairs, "format": "preference", "split": {"validation": 0.15, "test": 0.15}, "preprocessing": {"redactPii": False}},
        "hyperparameters": {"maxSteps": 16, "learningRate": 0.005, "batchSize": 8, "maxSeqLength": 64, "warmupRatio": 0.0,
                            "lrScheduler": "linear", "seed": 7, "packing": False},
        "evaluation": {"strategy": "steps", "everySteps": 8, "calibration": False},
        "checkpoint": {"everySteps": 4, "keepLast": 5}, "output": {"uri": str(out)},
    }
    for key, value in overrides.items():
        spec[key] = {**spec[key], **value} if isinstance(value, dict) else value
    return spec


def dpo_full_spec(assets, pairs, out):
    """DPO with method full: the reference is the base weights, which training overwrites."""
    spec = preference_spec(assets, pairs, out, {"type": "dpo", "beta": 0.3}, method="full", hyperparameters={"learningRate": 0.002})
    del spec["lora"]
    return spec


@pytest.fixture(scope="module")
def dpo_full(assets, pairs, tmp_path_factory):
    """One uninterrupted DPO run: what the learning test reads and every resumed run must repeat."""
    tmp = tmp_path_factory.mktemp("dpo-full")
    r = run_trainer(write_config(tmp / "job.yaml", dpo_full_spec(assets, pairs, tmp / "out")), tmp)
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp / "out", r.stderr


@pytest.mark.slow
def test_dpo_raises_validation_reward_accuracy_above_the_base_models_preference(dpo_full):
    out, stderr = dpo_full
    progress = json.loads((out / "progress.json").read_text())
    evaluation = progress["evaluation"]
    base = evaluation["baseline"]["base_model"]
    # The base model at step 0 is DPO's reference: its rewards are 0 by construction, so only its own preference is reported.
    assert set(base) == {"logp_accuracy", "eval_pairs"} and base["eval_pairs"] == 30
    assert 0.3 <= base["logp_accuracy"] <= 0.7  # a random tiny Llama prefers neither response
    final, test = evaluation["final"], evaluation["test"]
    assert final["reward_accuracy"] >= base["logp_accuracy"] + 0.25 and test["reward_accuracy"] >= base["logp_accuracy"] + 0.25
    assert final["eval_loss"] < math.log(2) - 0.05 and final["reward_margin"] > 0.1
    assert final["reward_margin"] == pytest.approx(final["chosen_reward"] - final["rejected_reward"])
    assert progress["gain"]["metric"] == "logp_accuracy" and progress["gain"]["final"] > progress["gain"]["baseline"]
    state = checkpoint_state(out, 16)
    assert [e["step"] for e in state["evals"]] == [8, 16] and all("reward_accuracy" in e for e in state["evals"])
    from finetune_api.status import ProgressDocument
    from finetune_operator.progress import project

    status = project(ProgressDocument.model_validate(progress))
    assert status["gain"]["metric"] == "logp_accuracy"
    assert json.loads((out / "model" / "model_card.json").read_text())["objective"] == {"type": "dpo", "beta": 0.3}
    card = (out / "model" / "README.md").read_text()
    assert "| Objective | DPO, beta=0.3; reference: the base model (its weights before training)" in card
    assert "| Reward accuracy |" in card and "| Log-prob preference accuracy |" in card
    train_pairs = json.loads((out / "data-report.json").read_text())["final_sizes"]["train"]
    assert f"reference log-probabilities of {train_pairs} train pairs computed with the base model" in stderr


@pytest.mark.slow
def test_a_dpo_full_fine_tune_killed_and_resumed_repeats_the_uninterrupted_losses(assets, pairs, dpo_full, tmp_path):
    """The resumed process no longer holds the base weights; it computes the reference again before loading the
    checkpoint, so the resumed losses equal the uninterrupted run's exactly."""
    expected = [(h["step"], h["loss"]) for h in checkpoint_state(dpo_full[0], 16)["history"]]
    out = tmp_path / "out"
    config = write_config(tmp_path / "job.yaml", dpo_full_spec(assets, pairs, out))
    proc = subprocess.Popen([sys.executable, str(RUNNER), "--config", str(config)], env=trainer_env(tmp_path, FT_TEST_STEP_SLEEP="0.3"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest = out / "checkpoints" / "step-00000004" / "manifest.json"
    deadline = time.monotonic() + 180
    while not manifest.exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    r = run_trainer(config, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    resumed = int(next(x for x in r.stderr.splitlines() if "resumed from" in x).split(" at step ")[1].split()[0])
    assert 4 <= resumed < 16
    assert [(h["step"], h["loss"]) for h in checkpoint_state(out, 16)["history"]] == expected


@pytest.mark.slow
def test_simpo_with_lora_learns_without_a_reference(assets, pairs, tmp_path):
    out = tmp_path / "out"
    spec = preference_spec(assets, pairs, out, {"type": "simpo"}, hyperparameters={"learningRate": 0.01})
    r = run_trainer(write_config(tmp_path / "job.yaml", spec), tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "reference log-probabilities" not in r.stderr
    evaluation = json.loads((out / "progress.json").read_text())["evaluation"]
    base, final = evaluation["baseline"]["base_model"], evaluation["test"]
    # Reference-free: the base model's rewards are its own length-normalised log-probs, so its reward accuracy is
    # its log-prob preference, and it is reported.
    assert base["reward_accuracy"] == base["logp_accuracy"]
    assert final["reward_accuracy"] >= base["reward_accuracy"] + 0.25
    assert final["eval_loss"] < base["eval_loss"] - 0.1
    assert "| Objective | SimPO (reference-free), beta=2, gamma=1 |" in (out / "model" / "README.md").read_text()


def test_the_trainer_refuses_bad_preference_jobs_with_the_words_of_the_api_server(tmp_path, monkeypatch):
    from finetune_trainer.__main__ import main

    log = tmp_path / "termination-log"
    for name, value in (("FINETUNE_TERMINATION_LOG", log), ("FINETUNE_METRICS_PORT", "0"), ("FINETUNE_WORK_DIR", tmp_path / "work")):
        monkeypatch.setenv(name, str(value))
    spec = {"model": {"uri": "/models/x"}, "objective": {"type": "dpo"}, "output": {"uri": str(tmp_path / "out")},
            "dataset": {"train": "/data/train.jsonl", "format": "preference"}, "hyperparameters": {"packing": True}}
    assert main(["--config", str(write_config(tmp_path / "a.yaml", spec))]) == 11
    assert log.read_text().startswith("InvalidConfig: spec: objective.type dpo and simpo need hyperparameters.packing false")
    spec["hyperparameters"] = {"packing": False}
    spec["evaluation"] = {"earlyStopping": {"metric": "perplexity"}}  # not computed on pairs
    assert main(["--config", str(write_config(tmp_path / "b.yaml", spec))]) == 11
    assert ("evaluation.earlyStopping.metric 'perplexity' is not computed for this task; use one of eval_loss, reward_accuracy, "
            "reward_margin, chosen_reward, rejected_reward, logp_accuracy") in log.read_text()
