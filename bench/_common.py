"""Shared machinery of the trainer benchmarks (``trainer_throughput.py`` on CPU, ``trainer_gpu.py`` on GPU).

One benchmark run is three child processes started by the parent script, so that each side's peak
memory (RSS, GPU) is its own and the parent never touches the GPU:

1. ``assets``: a tokenizer (MiniLM's 30k WordPiece, built locally, no hub), a causal LM initialised
   from a config (on the benchmark's device, saved in the compute dtype) and a JSONL file of text rows
   whose token counts follow a given length distribution.
2. ``baseline``: ``transformers.Trainer`` + PEFT LoRA with default settings apart from the ones named
   in :data:`BASELINE_SETTINGS` (dynamic padding to the longest row of each batch via
   ``DataCollatorForLanguageModeling(mlm=False)``, no packing).
3. ``ours``: ``finetune_trainer`` run from a FineTuneJob spec with ``packing: true``.

Both training sides measure the same way (:class:`StepClock`): wall time from the end of warmup step
``W`` (or the start of step 1 when ``W == 0``) to the end of the last optimizer step, with a device
sync at both ends, and the tokens (real and computed-on, i.e. including padding) and row lengths of
the batches trained on in between. Each child prints one ``RESULT {json}`` line.

    python bench/_common.py --child {assets|baseline|ours} PARAMS.json   # what spawn() runs
"""

from __future__ import annotations

import json
import math
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LEARNING_RATE = 2e-4

# Where the baseline departs from `TrainingArguments()` defaults, and why. Everything else (optimizer,
# scheduler, dataloader, attention implementation, logging cadence) is left at transformers' default.
BASELINE_SETTINGS = {
    "output_dir": "required argument; nothing is written there (save_strategy='no')",
    "per_device_train_batch_size": "the same micro-batch (rows per optimizer step) as ours",
    "max_steps": "the same number of optimizer steps as ours",
    "learning_rate": f"{LEARNING_RATE} like ours, so the two loss curves are comparable (no effect on speed)",
    "seed": "0, reproducible data order and LoRA init",
    "save_strategy": "'no': no checkpoint I/O (with the default 'steps'/500 none would be written in a short run anyway)",
    "report_to": "'none': no experiment-tracker integrations that happen to be installed",
    "bf16": "True on cuda only (bf16 autocast, as ours uses); the default is fp32",
    "activation_checkpointing": "as the preset says, like ours (gradient checkpointing; use_reentrant=False is transformers' default)",
}


# ------------------------------------------------------------------------------------------- data


def row_lengths(spec: dict[str, Any], n: int, seed: int = 0) -> list[int]:
    """``n`` row lengths in tokens (special tokens included) from a length distribution.

    ``{"dist": "uniform", "lo": 16, "hi": 256}`` or
    ``{"dist": "lognormal", "median": 350, "sigma": 1.0, "lo": 16, "hi": 4096}`` (clipped to [lo, hi]).
    """
    rng = random.Random(seed)
    lo, hi = int(spec["lo"]), int(spec["hi"])
    if spec["dist"] == "uniform":
        return [rng.randint(lo, hi) for _ in range(n)]
    if spec["dist"] == "lognormal":
        mu = math.log(float(spec["median"]))
        return [min(hi, max(lo, int(round(rng.lognormvariate(mu, float(spec["sigma"])))))) for _ in range(n)]
    raise ValueError(f"unknown length distribution {spec['dist']!r}")


def length_stats(lengths: list[int]) -> dict[str, Any]:
    s = sorted(lengths)
    if not s:
        return {"rows": 0}
    pick = lambda q: s[min(len(s) - 1, int(q * len(s)))]  # noqa: E731
    return {"rows": len(s), "mean": round(sum(s) / len(s), 1), "p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99), "max": s[-1]}


def _write_rows(path: Path, tok: Any, lengths: list[int], seed: int) -> list[int]:
    """Text rows that tokenise (with [CLS]/[SEP]) to ``lengths`` tokens; returns the lengths they really have.

    Rows are decoded slices of one long token stream of movie-review sentences: WordPiece decoding and
    re-encoding round-trip almost exactly, so each row lands on (or within a token or two of) its target.
    """
    from finetune_devcluster.assets import sentiment_rows

    rng = random.Random(seed)
    sentences = [r["text"] for r in sentiment_rows(600, seed=seed, planted=False)]
    special = len(tok("", add_special_tokens=True)["input_ids"])
    longest = max(lengths) if lengths else 0
    stream: list[int] = []
    while len(stream) < 2 * longest + 1024:
        rng.shuffle(sentences)
        stream += tok(" . ".join(sentences), add_special_tokens=False)["input_ids"]
    texts = []
    for n in lengths:
        body = max(1, n - special)
        start = rng.randrange(0, len(stream) - body)
        texts.append(tok.decode(stream[start : start + body]))
    with path.open("w") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    return [len(ids) for ids in tok(texts, add_special_tokens=True)["input_ids"]]


def build_assets(p: dict[str, Any]) -> dict[str, Any]:
    """Child ``assets``: tokenizer + model (from ``p['model_config']``) in ``p['model_dir']``, rows in ``p['data']``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from finetune_devcluster.assets import minilm_dir

    model_dir, seq = Path(p["model_dir"]), int(p["seq"])
    tok = AutoTokenizer.from_pretrained(str(minilm_dir()))
    tok.model_max_length = max(seq, tok.model_max_length)  # rows up to seq tokens are intended, not a mistake
    tok.save_pretrained(model_dir)
    kwargs = dict(p["model_config"])
    model_type = kwargs.pop("model_type")
    # A preset may keep a bigger vocabulary than the tokenizer's (the real model's, so that the embedding,
    # the LM head and the logits cost what they really cost); the data then only uses the first ids.
    kwargs["vocab_size"] = kwargs.get("vocab_size") or tok.vocab_size
    if kwargs["vocab_size"] < tok.vocab_size:
        raise ValueError(f"vocab_size {kwargs['vocab_size']} is smaller than the tokenizer's {tok.vocab_size}")
    config = AutoConfig.for_model(model_type, pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id,
                                  eos_token_id=tok.sep_token_id, **kwargs)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[p["precision"]]
    torch.manual_seed(int(p.get("seed", 0)))
    t0 = time.monotonic()
    with torch.device(p["device"]):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(model_dir)
    params = sum(t.numel() for t in model.parameters())
    del model
    lengths = _write_rows(Path(p["data"]), tok, p["lengths"], int(p.get("seed", 0)))
    return {"params": params, "model_seconds": time.monotonic() - t0, "tokenizer_vocab": tok.vocab_size,
            "model_vocab": config.vocab_size, "row_tokens": length_stats([min(n, seq) for n in lengths])}


# -------------------------------------------------------------------------------------- measuring


class StepClock:
    """Times optimizer steps ``warmup+1 .. total`` and records what they trained on.

    ``begin()`` at the start of step 1, ``end_step(...)`` at the end of every step. The device is
    synchronised only at the two marks that bound the timed window (end of step ``warmup``, or
    ``begin()`` when there is no warmup; end of step ``total``), so the measurement does not stall the
    pipeline between steps.
    """

    def __init__(self, warmup: int, total: int):
        import torch

        if not 0 <= warmup < total:
            raise ValueError(f"warmup ({warmup}) must be in [0, steps={total})")
        self.warmup, self.total = warmup, total
        self.cuda = torch.cuda.is_available()
        self.steps = 0
        self.t_start: float | None = None
        self.t_end: float | None = None
        self.real = self.computed = 0
        self.lengths: list[int] = []
        self.peak_gpu_bytes: int | None = None
        self.peak_gpu_reserved_bytes: int | None = None

    def _sync(self) -> float:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        return time.perf_counter()

    def begin(self) -> None:
        if self.steps == 0 and self.warmup == 0 and self.t_start is None:
            self.t_start = self._sync()

    def end_step(self, real: int, computed: int, lengths: list[int]) -> None:
        self.steps += 1
        if self.steps == self.warmup:
            self.t_start = self._sync()
        elif self.warmup < self.steps <= self.total:
            self.real += int(real)
            self.computed += int(computed)
            self.lengths += [int(n) for n in lengths]
            if self.steps == self.total:
                self.t_end = self._sync()
                if self.cuda:
                    import torch

                    self.peak_gpu_bytes = torch.cuda.max_memory_allocated()
                    self.peak_gpu_reserved_bytes = torch.cuda.max_memory_reserved()

    def summary(self) -> dict[str, Any]:
        if self.t_start is None or self.t_end is None:
            raise RuntimeError(f"timed window incomplete: {self.steps} of {self.total} steps seen")
        seconds = self.t_end - self.t_start
        mb = lambda b: None if b is None else b / 2**20  # noqa: E731
        return {
            "timed_steps": self.total - self.warmup, "warmup_steps": self.warmup, "tokens": self.real, "seconds": seconds,
            "tokens_per_s": self.real / seconds, "padding_fraction": 1 - self.real / self.computed if self.computed else 0.0,
            "peak_gpu_mem_mb": mb(self.peak_gpu_bytes), "peak_gpu_reserved_mb": mb(self.peak_gpu_reserved_bytes),
            "row_lengths": self.lengths,
        }


def _device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def run_baseline(p: dict[str, Any]) -> dict[str, Any]:
    """Child ``baseline``: plain ``transformers.Trainer`` + PEFT (see :data:`BASELINE_SETTINGS`)."""
    import torch
    from datasets import load_dataset
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling, Trainer, TrainerCallback,
                              TrainingArguments)

    torch.manual_seed(0)
    model_dir, seq, steps = str(p["model_dir"]), int(p["seq"]), int(p["steps"])
    tok = AutoTokenizer.from_pretrained(model_dir)
    # dtype: transformers' default ("auto"), i.e. the dtype the checkpoint was saved in (the compute dtype).
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                           LoraConfig(r=p["lora_r"], lora_alpha=p["lora_alpha"], lora_dropout=p["lora_dropout"],
                                      target_modules=LORA_TARGETS, task_type="CAUSAL_LM"))
    trainable = sum(t.numel() for t in model.parameters() if t.requires_grad)
    ds = load_dataset("json", data_files=str(p["data"]), split="train")
    ds = ds.map(lambda b: tok(b["text"], truncation=True, max_length=seq), batched=True, remove_columns=["text"])
    base = DataCollatorForLanguageModeling(tok, mlm=False)
    batches: list[tuple[int, int, list[int]]] = []  # per collated batch, in order; accelerate may collate one ahead

    def collate(rows: list[dict[str, Any]]) -> dict[str, Any]:
        out = base(rows)
        mask = out["attention_mask"]
        batches.append((int(mask.sum()), int(mask.numel()), mask.sum(dim=1).tolist()))
        return out

    clock = StepClock(int(p["warmup"]), steps)

    class Measure(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            clock.begin()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            real, computed, lengths = batches[state.global_step - 1]  # gradient accumulation is 1: batch i is step i+1
            clock.end_step(real, computed, lengths)

    cuda = p["device"] == "cuda"
    fields = TrainingArguments.__dataclass_fields__
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    args = TrainingArguments(output_dir=str(Path(p["out"]) / "hf"), per_device_train_batch_size=int(p["batch"]), max_steps=steps,
                             learning_rate=LEARNING_RATE, seed=0, save_strategy="no", report_to="none", bf16=cuda and p["precision"] == "bf16",
                             **{checkpointing: bool(p["gradient_checkpointing"])})
    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=collate, callbacks=[Measure()])
    result = trainer.train()
    return {**clock.summary(), "mean_train_loss": result.metrics.get("train_loss"), "trainable_params": trainable,
            "device_name": _device_name()}


def run_ours(p: dict[str, Any]) -> dict[str, Any]:
    """Child ``ours``: ``finetune_trainer`` on a FineTuneJob spec with ``packing: true``."""
    import yaml

    from finetune_trainer import train as T
    from finetune_trainer.config import load_config

    out = Path(p["out"])
    steps = int(p["steps"])
    spec = {
        "model": {"uri": str(p["model_dir"])},
        "method": "lora",
        "lora": {"r": p["lora_r"], "alpha": p["lora_alpha"], "dropout": p["lora_dropout"], "targetModules": LORA_TARGETS},
        "dataset": {"train": str(p["data"]), "format": "text", "split": {"validation": 0.01, "test": 0.01},
                    "leakageCheck": "off", "preprocessing": {"dedupe": {"exact": False, "near": False}, "redactPii": False}},
        "hyperparameters": {"maxSteps": steps, "batchSize": int(p["batch"]), "maxSeqLength": int(p["seq"]), "packing": True,
                            "learningRate": LEARNING_RATE, "seed": 0, "precision": p["precision"],
                            "gradientCheckpointing": bool(p["gradient_checkpointing"])},
        "evaluation": {"strategy": "steps", "everySteps": 100000, "baseline": False, "calibration": False},
        "checkpoint": {"everySteps": 100000, "keepLast": 1, "resume": "none"},
        "output": {"uri": str(out / "ours")},
    }
    out.mkdir(parents=True, exist_ok=True)
    cfg = out / "job.yaml"
    cfg.write_text(yaml.safe_dump({"apiVersion": "finetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "bench"}, "spec": spec}))
    clock = StepClock(int(p["warmup"]), steps)
    seen: dict[str, Any] = {"losses": []}
    original = T.Trainer._optimizer_step

    def measured(self: Any, window: list[list[int]]) -> dict[str, Any]:
        if "lengths" not in seen:  # once, before the clock can start
            seen["lengths"] = [len(ids) for ids in self.data.train["input_ids"]]
            seen["trainable"] = self.loaded.trainable_params
        clock.begin()
        m = original(self, window)
        real = int(m["tokens"])
        computed = round(real / (1 - m["padding"])) if m["padding"] else real
        clock.end_step(real, computed, [seen["lengths"][i] for rows in window for i in rows])
        seen["losses"].append(m["loss"])
        return m

    T.Trainer._optimizer_step = measured
    T.run(load_config(cfg))
    losses = seen["losses"]
    return {**clock.summary(), "mean_train_loss": sum(losses) / len(losses), "trainable_params": seen["trainable"],
            "device_name": _device_name()}


# ---------------------------------------------------------------------------------------- processes

_CHILDREN = {"assets": build_assets, "baseline": run_baseline, "ours": run_ours}


def child_main(which: str, params_path: str) -> None:
    p = json.loads(Path(params_path).read_text())
    os.environ.setdefault("FINETUNE_METRICS_PORT", "0")
    os.environ.setdefault("FINETUNE_WORK_DIR", str(Path(p["out"]) / "work"))
    t0 = time.monotonic()
    result = _CHILDREN[which](p)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["child_wall_s"] = time.monotonic() - t0
    print("RESULT " + json.dumps(result), flush=True)


def spawn(which: str, params: dict[str, Any], work: Path, device: str, *, tolerate_oom: bool = False) -> dict[str, Any]:
    """Run child ``which`` in a fresh interpreter; its stderr goes to ``work/which.log``.

    A failed child ends the benchmark, except that with ``tolerate_oom`` a child that ran out of GPU
    memory gives ``{"error": "out of memory", ...}`` (a result in itself: the other side may fit).
    """
    work.mkdir(parents=True, exist_ok=True)
    params_path = work / f"{which}.params.json"
    params_path.write_text(json.dumps({"out": str(work / which), **params}))
    env = {**os.environ, "OMP_NUM_THREADS": str(os.cpu_count()), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # our trainer takes the GPU whenever one is visible
    log = work / f"{which}.log"
    t0 = time.monotonic()
    with log.open("w") as f:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", which, str(params_path)],
                              stdout=subprocess.PIPE, stderr=f, text=True, env=env)
    f_text = log.read_text()
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode != 0 or not line:
        if tolerate_oom and ("OutOfMemoryError" in f_text or "CUDA out of memory" in f_text):
            tail = [l for l in f_text.splitlines() if "out of memory" in l.lower()][-1:]
            return {"error": "out of memory", "detail": tail[0][:500] if tail else "", "log": str(log), "wall_s": time.monotonic() - t0}
        raise SystemExit(f"{which} failed ({proc.returncode}); log {log}:\n{proc.stdout[-2000:]}\n{f_text[-6000:]}")
    return {**json.loads(line[0][len("RESULT "):]), "wall_s": time.monotonic() - t0}


def default_rows(steps: int, batch: int) -> int:
    """Enough rows that both sides stay in their first epoch (ours holds 2 % back for validation/test)."""
    return max(200, math.ceil(1.1 * steps * batch) + 4 * batch)


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def write_report(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        child_main(sys.argv[2], sys.argv[3])
    else:
        raise SystemExit(__doc__)
