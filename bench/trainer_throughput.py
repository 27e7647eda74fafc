"""Trainer throughput benchmark: our trainer against the plain transformers Trainer + PEFT.

Same model (a Llama-shaped causal LM initialised from a config, with MiniLM's 30k-token tokenizer),
same data (rows of 16-256 tokens, the length spread of real instruction data), same LoRA adapter
(r=16 on the attention and MLP projections), same micro-batch size and number of optimizer steps,
same machine, in one run; each side in its own process so peak memory is its own.

- baseline: `transformers.Trainer` with default settings: dynamic padding to the longest row of each
  batch (`DataCollatorForLanguageModeling(mlm=False)`), no packing.
- ours: `finetune_trainer` with `packing: true` (padding-free batches, attention kept per row).

Reported: tokens/s (real, non-pad tokens trained on per second of training), padding fraction, and
peak RSS; and ours/baseline ratios. Results: bench/results/trainer-throughput.json.

    python bench/trainer_throughput.py [--steps 30] [--batch 8]

On a GPU machine add `--device cuda` (the model then runs in bf16 where supported); the MFU figures
for the 8B case are not produced by this script yet.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_assets(work: Path, rows: int, seed: int = 0) -> tuple[Path, Path]:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from finetune_devcluster.assets import minilm_dir, sentiment_rows

    model_dir = work / "model"
    tok = AutoTokenizer.from_pretrained(str(minilm_dir()))
    tok.save_pretrained(model_dir)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id)
    LlamaForCausalLM(config).save_pretrained(model_dir)
    rng = random.Random(seed)
    sentences = [r["text"] for r in sentiment_rows(600, seed=seed, planted=False)]
    data = work / "train.jsonl"
    with data.open("w") as f:
        for _ in range(rows):
            target = rng.randint(16, 256)  # tokens, roughly one per word here
            words: list[str] = []
            while len(words) < target:
                words += rng.choice(sentences).split()
            f.write(json.dumps({"text": " ".join(words[:target])}) + "\n")
    return model_dir, data


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def run_baseline(model_dir: Path, data: Path, steps: int, batch: int, seq: int, out: Path) -> dict:
    import torch
    from datasets import load_dataset
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling, Trainer,
                              TrainingArguments)

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(model_dir)),
                           LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=LORA_TARGETS, task_type="CAUSAL_LM"))
    ds = load_dataset("json", data_files=str(data), split="train")
    ds = ds.map(lambda b: tok(b["text"], truncation=True, max_length=seq), batched=True, remove_columns=["text"])
    base = DataCollatorForLanguageModeling(tok, mlm=False)
    counts = {"real": 0, "total": 0}

    def collate(rows):
        out = base(rows)
        counts["real"] += int(out["attention_mask"].sum())
        counts["total"] += int(out["attention_mask"].numel())
        return out

    args = TrainingArguments(output_dir=str(out / "hf"), per_device_train_batch_size=batch, max_steps=steps, learning_rate=2e-4,
                             logging_steps=steps, save_strategy="no", report_to=[], seed=0, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=collate)
    result = trainer.train()
    seconds = result.metrics["train_runtime"]
    return {"tokens": counts["real"], "seconds": seconds, "tokens_per_s": counts["real"] / seconds,
            "padding_fraction": 1 - counts["real"] / counts["total"], "final_loss": result.metrics.get("train_loss")}


def run_ours(model_dir: Path, data: Path, steps: int, batch: int, seq: int, out: Path) -> dict:
    import yaml

    from finetune_trainer import train as T
    from finetune_trainer.config import load_config

    spec = {
        "model": {"uri": str(model_dir)},
        "method": "lora",
        "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "targetModules": LORA_TARGETS},
        "dataset": {"train": str(data), "format": "text", "split": {"validation": 0.01, "test": 0.01},
                    "leakageCheck": "off", "preprocessing": {"dedupe": {"exact": False, "near": False}, "redactPii": False}},
        "hyperparameters": {"maxSteps": steps, "batchSize": batch, "maxSeqLength": seq, "packing": True, "learningRate": 2e-4, "seed": 0},
        "evaluation": {"strategy": "steps", "everySteps": 100000, "baseline": False, "calibration": False},
        "checkpoint": {"everySteps": 100000, "keepLast": 1, "resume": "none"},
        "output": {"uri": str(out / "ours")},
    }
    out.mkdir(parents=True, exist_ok=True)
    cfg = out / "job.yaml"
    cfg.write_text(yaml.safe_dump({"apiVersion": "finetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "bench"}, "spec": spec}))
    stats = {"tokens": 0, "seconds": 0.0, "padding": []}
    original = T.Trainer._optimizer_step

    def measured(self, window):
        m = original(self, window)
        stats["tokens"] += m["tokens"]
        stats["seconds"] += m["seconds"]
        if m["padding"] is not None:
            stats["padding"].append(m["padding"])
        return m

    T.Trainer._optimizer_step = measured
    T.run(load_config(cfg))
    return {"tokens": stats["tokens"], "seconds": stats["seconds"], "tokens_per_s": stats["tokens"] / stats["seconds"],
            "padding_fraction": sum(stats["padding"]) / max(1, len(stats["padding"]))}


def child(which: str, model_dir: str, data: str, steps: int, batch: int, seq: int, out: str) -> None:
    os.environ.setdefault("FINETUNE_METRICS_PORT", "0")
    os.environ.setdefault("FINETUNE_WORK_DIR", str(Path(out) / "work"))
    fn = run_baseline if which == "baseline" else run_ours
    result = fn(Path(model_dir), Path(data), steps, batch, seq, Path(out))
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--rows", type=int, default=600)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "trainer-throughput.json")
    ap.add_argument("--child", nargs=7, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        which, model_dir, data, steps, batch, seq, out = args.child
        child(which, model_dir, data, int(steps), int(batch), int(seq), out)
        return
    work = Path(tempfile.mkdtemp(prefix="bench-trainer-"))
    model_dir, data = make_assets(work, args.rows)
    results = {}
    for which in ("baseline", "ours"):
        t0 = time.monotonic()
        proc = subprocess.run([sys.executable, __file__, "--child", which, str(model_dir), str(data), str(args.steps), str(args.batch),
                               str(args.seq), str(work / which)], capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": str(os.cpu_count()), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"})
        line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode != 0 or not line:
            raise SystemExit(f"{which} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        results[which] = {**json.loads(line[0][len("RESULT "):]), "wall_s": time.monotonic() - t0}
    b, o = results["baseline"], results["ours"]
    report = {
        "setup": {"model": "Llama-shaped, hidden 256, 4 layers, vocab 30522 (from config)", "lora": "r=16 on q,k,v,o,gate,up,down",
                  "steps": args.steps, "micro_batch": args.batch, "max_seq_length": args.seq, "rows": args.rows,
                  "row_tokens": "16-256", "device": "cpu", "cpus": os.cpu_count(), "python": platform.python_version()},
        **results,
        "ratios_ours_over_baseline": {"tokens_per_s": o["tokens_per_s"] / b["tokens_per_s"], "peak_rss": o["peak_rss_mb"] / b["peak_rss_mb"]},
        "targets": {"padding_at_most_5_percent": o["padding_fraction"] <= 0.05},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
