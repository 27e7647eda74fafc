"""Trainer throughput benchmark: our trainer against the plain transformers Trainer + PEFT.

Same model (a Llama-shaped causal LM initialised from a config, with MiniLM's 30k-token tokenizer),
same data (rows of 16-256 tokens, the length spread of real instruction data), same LoRA adapter
(r=16 on the attention and MLP projections), same micro-batch size and number of optimizer steps,
same machine, in one run; each side in its own process so peak memory is its own.

- baseline: `transformers.Trainer` with default settings: dynamic padding to the longest row of each
  batch (`DataCollatorForLanguageModeling(mlm=False)`), no packing.
- ours: `finetune_trainer` with `packing: true` (padding-free batches, attention kept per row).

Reported: tokens/s (real, non-pad tokens trained on per second of training, from the end of step
`--warmup` to the end of the last step), padding fraction, and peak RSS; and ours/baseline ratios.
Results: bench/results/trainer-throughput.json (or --out). The machinery is shared with the GPU
benchmark (bench/_common.py); bench/trainer_gpu.py is the GPU half (bf16, 8B/0.5B shapes, MFU).

    python bench/trainer_throughput.py [--steps 30] [--batch 8] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import ROOT, default_rows, ratio, row_lengths, spawn, write_report  # noqa: E402

MODEL = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 4,
         "num_key_value_heads": 4, "max_position_embeddings": 1024}
LENGTHS = {"dist": "uniform", "lo": 16, "hi": 256}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=0, help="steps left out of the timing (default 0, as in the recorded results)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--rows", type=int, default=600)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "trainer-throughput.json")
    ap.add_argument("--keep-work", action="store_true", help="keep the temporary model, data and logs")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-trainer-"))
    rows = max(args.rows, default_rows(args.steps, args.batch))
    assets = spawn("assets", {"model_dir": str(work / "model"), "data": str(work / "train.jsonl"), "seq": args.seq,
                              "model_config": MODEL, "precision": "fp32", "device": "cpu", "lengths": row_lengths(LENGTHS, rows)},
                   work, "cpu")
    common = {"model_dir": str(work / "model"), "data": str(work / "train.jsonl"), "steps": args.steps, "warmup": args.warmup,
              "batch": args.batch, "seq": args.seq, "precision": "fp32", "device": "cpu", "gradient_checkpointing": False,
              "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.05}
    results = {}
    for which in ("baseline", "ours"):
        r = spawn(which, common, work, "cpu")
        r.pop("row_lengths")
        results[which] = r
    b, o = results["baseline"], results["ours"]
    report = {
        "setup": {"model": "Llama-shaped, hidden 256, 4 layers, vocab 30522 (from config)", "lora": "r=16 on q,k,v,o,gate,up,down",
                  "steps": args.steps, "warmup_steps": args.warmup, "micro_batch": args.batch, "max_seq_length": args.seq, "rows": rows,
                  "row_tokens": "16-256 (uniform)", "row_token_stats": assets["row_tokens"], "device": "cpu", "cpus": os.cpu_count(),
                  "python": platform.python_version()},
        **results,
        "ratios_ours_over_baseline": {"tokens_per_s": ratio(o["tokens_per_s"], b["tokens_per_s"]),
                                      "peak_rss": ratio(o["peak_rss_mb"], b["peak_rss_mb"])},
        "targets": {"padding_at_most_5_percent": o["padding_fraction"] <= 0.05},
    }
    write_report(args.out, report)
    print(json.dumps(report, indent=2))
    if not args.keep_work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
