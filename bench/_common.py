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
4. ``trl-defaults``, ``trl-matched``, ``trl-padding-free``, ``trl-bfd-packing``: TRL's ``SFTTrainer``
   with the same model, tokens, LoRA adapter, rows per step, steps, max length and seed, in the
   configurations of :data:`TRL_CONTESTANTS` (their ``SFTConfig`` arguments are recorded per result).

Every training side measures the same way (:class:`StepClock`): wall time from the end of warmup step
``W`` (or the start of step 1 when ``W == 0``) to the end of the last optimizer step, with a device
sync at both ends, and the tokens (real and computed-on, i.e. including padding) and row lengths of
the batches trained on in between. Real tokens are the tokens of the rows in the batch (the
tokenizer's [CLS]/[SEP] included, padding excluded), counted from the batch the model receives: the
attention mask of a padded batch, the row boundaries (``position_ids`` restarting at 0) of a
padding-free one. Every side also records its per-step training loss (the mean token loss of the
step's batch, as the side computed it) and its peak RSS. Each child prints one ``RESULT {json}`` line.

    python bench/_common.py --child {assets|baseline|ours|trl-...} PARAMS.json   # what spawn() runs
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
from typing import Any, Callable

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


def record_losses(trainer: Any) -> list[Any]:
    """Wrap ``trainer.compute_loss`` so each training step's loss is kept (detached; no device sync per step).

    With gradient accumulation 1 and one process, ``compute_loss`` runs once per optimizer step and returns
    the mean token loss of that step's batch.
    """
    losses: list[Any] = []
    original = trainer.compute_loss

    def compute_loss(model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        out = original(model, inputs, *args, **kwargs)
        if model.training:
            losses.append((out[0] if isinstance(out, tuple) else out).detach())
        return out

    trainer.compute_loss = compute_loss
    return losses


def counted_steps(collator: Callable[[list[dict[str, Any]]], dict[str, Any]], warmup: int, steps: int) -> tuple[Any, StepClock, Any]:
    """(a collator that records each batch's tokens, the step clock, a TrainerCallback that times each step with the
    tokens of its batch): the one way every transformers-Trainer-based side (baseline, TRL) is measured."""
    from transformers import TrainerCallback

    batches: list[tuple[int, int, list[int]]] = []  # per collated batch, in order; accelerate may collate one ahead
    clock = StepClock(warmup, steps)

    def collate(rows: list[dict[str, Any]]) -> dict[str, Any]:
        out = collator(rows)
        batches.append(batch_tokens(out))
        return out

    class Measure(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            clock.begin()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            real, computed, lengths = batches[state.global_step - 1]  # gradient accumulation is 1: batch i is step i+1
            clock.end_step(real, computed, lengths)

    return collate, clock, Measure()


def batch_tokens(batch: dict[str, Any]) -> tuple[int, int, list[int]]:
    """(real tokens, tokens computed on, row lengths) of a collated causal-LM batch.

    Padded batches have an attention mask; padding-free ones (everything flattened into one row) have
    ``position_ids`` that restart at 0 at each row and no mask. Either way the real tokens are the rows'
    tokens, special tokens included and padding excluded.
    """
    mask = batch.get("attention_mask")
    if mask is not None:
        return int(mask.sum()), int(mask.numel()), mask.sum(dim=1).tolist()
    pos = batch["position_ids"]
    if pos.shape[0] != 1:
        raise ValueError(f"a padding-free batch is one flattened row, not {tuple(pos.shape)}")
    starts = (pos[0] == 0).nonzero().flatten().tolist() + [pos.shape[1]]
    lengths = [b - a for a, b in zip(starts, starts[1:])]
    return sum(lengths), int(pos.numel()), lengths


def run_baseline(p: dict[str, Any]) -> dict[str, Any]:
    """Child ``baseline``: plain ``transformers.Trainer`` + PEFT (see :data:`BASELINE_SETTINGS`)."""
    import torch
    from datasets import load_dataset
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling, Trainer,
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
    collate, clock, measure = counted_steps(base, int(p["warmup"]), steps)

    cuda = p["device"] == "cuda"
    fields = TrainingArguments.__dataclass_fields__
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    args = TrainingArguments(output_dir=str(Path(p["out"]) / "hf"), per_device_train_batch_size=int(p["batch"]), max_steps=steps,
                             learning_rate=LEARNING_RATE, seed=0, save_strategy="no", report_to="none", bf16=cuda and p["precision"] == "bf16",
                             **{checkpointing: bool(p["gradient_checkpointing"])})
    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=collate, callbacks=[measure])
    losses = record_losses(trainer)
    result = trainer.train()
    return {**clock.summary(), "mean_train_loss": result.metrics.get("train_loss"), "losses": [float(l) for l in losses],
            "trainable_params": trainable, "device_name": _device_name()}


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
    return {**clock.summary(), "mean_train_loss": sum(losses) / len(losses), "losses": losses, "trainable_params": seen["trainable"],
            "device_name": _device_name()}


# ------------------------------------------------------------------------------------------- TRL

# What every TRL contestant shares, and why. TRL's own defaults apply to everything else (SFTConfig
# overrides a few TrainingArguments defaults: bf16=True, gradient_checkpointing=True, learning_rate=2e-5,
# logging_steps=10).
TRL_SHARED_SETTINGS = {
    "model": "the same checkpoint path, loaded by SFTTrainer itself (SFTConfig.model_init_kwargs; TRL's default dtype is float32)",
    "peft_config": "peft.LoraConfig with the same r, alpha, dropout and target modules as ours, task_type CAUSAL_LM, passed to SFTTrainer",
    "train_dataset": "the same rows tokenised exactly as the baseline does (truncation at max seq, [CLS] ... [SEP]), passed as a "
                     "processed dataset (an input_ids column): TRL then adds no EOS (this WordPiece tokenizer has no eos_token, "
                     "which TRL's text path requires) and the token ids are the baseline's",
    "per_device_train_batch_size": "the same micro-batch as ours (with packing: that many packed sequences of max_length tokens)",
    "max_steps": "the same number of optimizer steps as ours",
    "max_length": "the same max sequence length as ours (SFTConfig's default is 1024)",
    "seed": "0, like the other sides",
    "save_strategy": "'no': no checkpoint I/O",
    "report_to": "'none': no experiment-tracker integrations that happen to be installed",
    "use_cpu": "True on CPU runs only: with SFTConfig's bf16=True default, TrainingArguments refuses to start on a machine "
               "without a bf16 GPU unless use_cpu is set (what a new user on CPU has to add)",
}

# TRL 1.16's own words (trl/trainer/sft_config.py, SFTConfig docstring), copied beside the numbers of the
# configurations they concern.
TRL_FLASH_ATTENTION_NOTE = (
    "TRL documents padding_free as 'Currently, this is only supported with the FlashAttention 2 or 3, which can efficiently "
    "handle the flattened batch structure. When packing is enabled with strategy \"bfd\", padding-free is enabled, regardless "
    "of the value of this parameter.' (SFTConfig docstring, trl 1.16). Without flash-attention, transformers' sdpa path "
    "(masking_utils.find_packed_sequence_indices) rebuilds the row boundaries from position_ids, so the loss is still per row, "
    "but through a dense block-diagonal mask over the whole flattened batch.")

TRL_CONTESTANTS: dict[str, dict[str, Any]] = {
    "trl-defaults": {
        "description": "SFTConfig defaults as a new user gets them (bf16 autocast, gradient checkpointing, lr 2e-5, padded "
                       "batches), apart from TRL_SHARED_SETTINGS",
        "matched": False, "mode": "padded",
    },
    "trl-matched": {
        "description": "bf16 (cuda) / fp32 (CPU), gradient checkpointing, learning rate and weight dtype matched to ours; "
                       "padded batches (TRL's default collator)",
        "matched": True, "mode": "padded",
    },
    "trl-padding-free": {
        "description": "trl-matched + padding_free=True (the micro-batch flattened into one row, no padding); max_length=None "
                       "because TRL refuses padding_free without packing when max_length is set (the rows are already truncated)",
        "matched": True, "mode": "padding_free",
    },
    "trl-bfd-packing": {
        "description": "trl-matched + packing=True, packing_strategy='bfd' (best-fit decreasing into max_length-token "
                       "sequences; implies padding-free)",
        "matched": True, "mode": "bfd",
    },
}


def trl_sftconfig_kwargs(name: str, p: dict[str, Any]) -> dict[str, Any]:
    """The SFTConfig arguments (``output_dir`` aside) that contestant ``name`` passes, for params ``p``.

    On cuda the padding-free and packing configurations also ask for flash-attention 2 and Liger's
    kernels when those packages are installed (TRL's fastest setup); otherwise they run on transformers'
    default attention (sdpa). What was used is recorded with the result.
    """
    import importlib.util

    c = TRL_CONTESTANTS[name]
    cuda = p["device"] == "cuda"
    kw: dict[str, Any] = {"per_device_train_batch_size": int(p["batch"]), "max_steps": int(p["steps"]), "max_length": int(p["seq"]),
                          "seed": 0, "save_strategy": "no", "report_to": "none"}
    if not cuda:
        kw["use_cpu"] = True
    if c["matched"]:
        bf16 = cuda and p["precision"] == "bf16"
        kw.update(bf16=bf16, gradient_checkpointing=bool(p["gradient_checkpointing"]), learning_rate=LEARNING_RATE,
                  model_init_kwargs={"dtype": "bfloat16" if bf16 else "float32"})
    if c["mode"] == "padding_free":
        kw.update(padding_free=True, max_length=None)
    elif c["mode"] == "bfd":
        kw.update(packing=True, packing_strategy="bfd")
    if cuda and c["mode"] in ("padding_free", "bfd"):
        if importlib.util.find_spec("flash_attn") is not None:
            kw["model_init_kwargs"] = {**kw.get("model_init_kwargs", {}), "attn_implementation": "flash_attention_2"}
        if importlib.util.find_spec("liger_kernel") is not None:
            kw["use_liger_kernel"] = True
    return kw


def run_trl(p: dict[str, Any]) -> dict[str, Any]:
    """Child ``trl-*``: TRL's ``SFTTrainer`` in configuration ``p['trl']`` (see :data:`TRL_CONTESTANTS`)."""
    import torch
    import trl
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    name = p["trl"]
    model_dir, seq, steps = str(p["model_dir"]), int(p["seq"]), int(p["steps"])
    kwargs = trl_sftconfig_kwargs(name, p)
    tok = AutoTokenizer.from_pretrained(model_dir)
    ds = load_dataset("json", data_files=str(p["data"]), split="train")
    ds = ds.map(lambda b: tok(b["text"], truncation=True, max_length=seq), batched=True, remove_columns=["text"])
    ds = ds.remove_columns([c for c in ds.column_names if c != "input_ids"])
    lora = LoraConfig(r=p["lora_r"], lora_alpha=p["lora_alpha"], lora_dropout=p["lora_dropout"], target_modules=LORA_TARGETS,
                      task_type="CAUSAL_LM")
    args = SFTConfig(output_dir=str(Path(p["out"]) / "trl"), **kwargs)
    torch.manual_seed(0)  # the LoRA initialisation happens in SFTTrainer's constructor
    trainer = SFTTrainer(model=model_dir, args=args, train_dataset=ds, processing_class=tok, peft_config=lora)
    # TRL refuses a custom collator with padding-free batches, so the counting wraps the one it built.
    trainer.data_collator, clock, measure = counted_steps(trainer.data_collator, int(p["warmup"]), steps)
    trainer.add_callback(measure)
    losses = record_losses(trainer)
    result = trainer.train()
    model = trainer.model
    trainable = sum(t.numel() for t in model.parameters() if t.requires_grad)
    config = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
    return {**clock.summary(), "mean_train_loss": result.metrics.get("train_loss"), "losses": [float(l) for l in losses],
            "trainable_params": trainable, "device_name": _device_name(), "trl_version": trl.__version__,
            "sftconfig": {k: v for k, v in kwargs.items()}, "attn_implementation": getattr(config, "_attn_implementation", None),
            "weight_dtype": str(next(model.get_base_model().parameters()).dtype) if hasattr(model, "get_base_model") else None,
            "packed_sequences_per_step": int(p["batch"]) if kwargs.get("packing") else None}


def trl_report(name: str, r: dict[str, Any]) -> dict[str, Any]:
    """A TRL side's result with its description and, for padding-free/packing modes, TRL's flash-attention note."""
    c = TRL_CONTESTANTS[name]
    out = {"description": c["description"], **r}
    if c["mode"] in ("padding_free", "bfd"):
        out["flash_attention_note"] = TRL_FLASH_ATTENTION_NOTE
    return out


# ------------------------------------------------------------------------------------------ loss


def loss_comparison(ours: list[float], others: dict[str, list[float] | None]) -> dict[str, Any]:
    """Mean training loss over the second half of the steps, ours against each other side, with the difference.

    Steps are compared by index; the sides see the same rows per step (except packing, where a step is
    ``batch`` packed sequences) but not in the same order, so a difference within a few step-to-step standard
    deviations of ours (``ours_step_std``, over the same half) is noise.
    """
    def tail(xs: list[float]) -> list[float]:
        return xs[len(xs) // 2:]

    mine = tail(ours)
    mean = sum(mine) / len(mine)
    std = (sum((x - mean) ** 2 for x in mine) / max(1, len(mine) - 1)) ** 0.5
    out: dict[str, Any] = {"window": f"steps {len(ours) // 2 + 1}..{len(ours)}", "ours_mean": mean, "ours_step_std": std, "vs": {}}
    for name, xs in others.items():
        if not xs:
            continue
        theirs = tail(xs)
        m = sum(theirs) / len(theirs)
        out["vs"][name] = {"mean": m, "ours_minus_theirs": mean - m, "in_ours_step_stds": (mean - m) / std if std else None}
    return out


# ---------------------------------------------------------------------------------------- processes

_CHILDREN = {"assets": build_assets, "baseline": run_baseline, "ours": run_ours, **{name: run_trl for name in TRL_CONTESTANTS}}


def child_main(which: str, params_path: str) -> None:
    p = json.loads(Path(params_path).read_text())
    if which in TRL_CONTESTANTS:
        p["trl"] = which
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
    load_before = os.getloadavg()[0]  # other work on the machine slows a side down; recorded with its result
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
    return {**json.loads(line[0][len("RESULT "):]), "wall_s": time.monotonic() - t0,
            "load_average_1min": {"start": load_before, "end": os.getloadavg()[0]}}


def default_rows(steps: int, batch: int, *, seq: int | None = None, lengths: dict[str, Any] | None = None) -> int:
    """Enough rows that every side stays in its first epoch (ours holds 2 % back for validation/test).

    With ``seq`` and the length distribution ``lengths``, also enough for TRL's bfd packing, whose step is
    ``batch`` packed sequences of up to ``seq`` tokens (the mean row length estimated from 10000 draws).
    """
    rows = max(200, math.ceil(1.1 * steps * batch) + 4 * batch)
    if seq and lengths:
        sample = [min(n, seq) for n in row_lengths(lengths, 10000, seed=1)]
        rows = max(rows, math.ceil(1.1 * steps * batch * seq / (sum(sample) / len(sample))))
    return rows


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def run_rounds(names: list[str], common: dict[str, Any], work: Path, device: str, rounds: int, *, tolerate_oom: bool = False,
               log: Any = None) -> dict[str, dict[str, Any]]:
    """Each side ``rounds`` times, interleaved (round 1: every side once, round 2: again in reverse order, ...).

    On a machine shared with other work, a side's speed follows the load while it runs; interleaving spreads
    the load drift over all sides, and each side keeps its best round (the one least slowed down by other
    work: ``tokens_per_s`` and ``seconds`` are that round's), with every round's tokens/s and load beside it
    (``rounds``) and the highest peak RSS of its rounds. Training is deterministic per side, so the loss
    curve is the same in every round (the first one's is kept).
    """
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for i in range(rounds):
        for name in (names if i % 2 == 0 else names[::-1]):  # odd rounds in reverse: no side always runs first or last
            r = spawn(name, common, work, device, tolerate_oom=tolerate_oom)
            runs[name].append(r)
            if log:
                log(f"round {i + 1}/{rounds} {name}: " + (r["error"] if "error" in r else
                    f"{r['tokens_per_s']:.1f} tokens/s, padding {r['padding_fraction']:.1%}, peak RSS {r['peak_rss_mb']:.0f} MB, "
                    f"load {r['load_average_1min']['start']:.1f}->{r['load_average_1min']['end']:.1f}"))
    out = {}
    for name, rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            out[name] = rs[0]
            continue
        best = max(ok, key=lambda r: r["tokens_per_s"])
        out[name] = {**best, "losses": ok[0]["losses"], "peak_rss_mb": max(r["peak_rss_mb"] for r in ok),
                     "rounds": [{"error": r["error"]} if "error" in r else
                                {"tokens_per_s": r["tokens_per_s"], "peak_rss_mb": r["peak_rss_mb"], "load_average_1min": r["load_average_1min"]}
                                for r in rs]}
        if name in TRL_CONTESTANTS:
            out[name] = trl_report(name, out[name])
    return out


def compare_with_trl(ours: dict[str, Any], trl: dict[str, dict[str, Any]], *, gpu: bool, tps_goal: float = 1.5,
                     rss_goal: float = 0.8, loss_noise_stds: float = 2.0) -> dict[str, Any]:
    """Ours against every TRL configuration and against the fastest one, with the issue's goals marked.

    Goals: ours' tokens/s at least ``tps_goal`` x the fastest TRL configuration's (on CPU and on GPU); on
    CPU also peak RSS at most ``rss_goal`` x that configuration's and the same loss (mean over the second
    half of the steps within ``loss_noise_stds`` step-to-step standard deviations of ours). The loss goal is
    judged against the fastest configuration that uses our learning rate (trl-defaults keeps TRL's 2e-5).
    """
    ok = {n: r for n, r in trl.items() if "error" not in r}
    per = {n: {"tokens_per_s": ratio(ours.get("tokens_per_s"), r["tokens_per_s"]), "peak_rss": ratio(ours.get("peak_rss_mb"), r["peak_rss_mb"]),
               **({"peak_gpu_mem": ratio(ours.get("peak_gpu_mem_mb"), r.get("peak_gpu_mem_mb"))} if gpu else {})} for n, r in ok.items()}
    best = max(ok, key=lambda n: ok[n]["tokens_per_s"]) if ok else None
    same_lr = [n for n in ok if TRL_CONTESTANTS[n]["matched"]]
    best_same_lr = max(same_lr, key=lambda n: ok[n]["tokens_per_s"]) if same_lr else None
    losses = loss_comparison(ours["losses"], {n: r.get("losses") for n, r in ok.items()}) if ours.get("losses") else None

    def goal(value: float | None, threshold: float, at_least: bool, note: str) -> dict[str, Any]:
        met = None if value is None else (value >= threshold if at_least else value <= threshold)
        return {"value": value, "threshold": threshold, "comparison": ">=" if at_least else "<=",
                "status": "not measured" if met is None else ("met" if met else "not met"), "note": note}

    goals = {"tokens_per_s_over_best_trl_at_least_%s" % tps_goal: goal(
        per[best]["tokens_per_s"] if best else None, tps_goal, True, f"against {best}, the fastest TRL configuration of this run")}
    if not gpu:
        goals["peak_rss_over_best_trl_at_most_%s" % rss_goal] = goal(per[best]["peak_rss"] if best else None, rss_goal, False,
                                                                     f"against {best}")
        if losses and best_same_lr in losses["vs"]:
            d = losses["vs"][best_same_lr]["in_ours_step_stds"]
            goals["same_loss_within_noise"] = goal(None if d is None else abs(d), loss_noise_stds, False,
                                                   f"|ours - {best_same_lr}| mean loss over {losses['window']}, in step-to-step standard "
                                                   "deviations of ours")
    return {"per_configuration": per, "best_trl": best, "best_trl_tokens_per_s": ok[best]["tokens_per_s"] if best else None,
            "ours_over_best_trl": per.get(best), "loss_comparison": losses, "goals": goals}


def versions() -> dict[str, str]:
    """Versions of what the sides run on (trl's when installed)."""
    import importlib.metadata as md

    import torch

    out = {name: md.version(name) for name in ("torch", "transformers", "peft", "accelerate", "datasets")}
    for name in ("trl", "flash-attn", "liger-kernel"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    out["cuda"] = str(torch.version.cuda)
    return out


def write_report(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        child_main(sys.argv[2], sys.argv[3])
    else:
        raise SystemExit(__doc__)
