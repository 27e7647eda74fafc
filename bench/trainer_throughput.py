"""Trainer throughput benchmark: our trainer against the plain transformers Trainer + PEFT and TRL's SFTTrainer.

Same model (a Llama-shaped causal LM initialised from a config, with MiniLM's 30k-token tokenizer),
same data (rows of 16-256 tokens, the length spread of real instruction data), same LoRA adapter
(r=16 on the attention and MLP projections), same micro-batch size and number of optimizer steps,
same machine, in one run; each side in its own process so peak memory is its own.

- baseline: `transformers.Trainer` with default settings: dynamic padding to the longest row of each
  batch (`DataCollatorForLanguageModeling(mlm=False)`), no packing.
- ours: `finetune_trainer` with `packing: true` (padding-free batches, attention kept per row).
- TRL (`trl.SFTTrainer`, version pinned in constraints.txt, the `bench` extra), four configurations
  (`_common.TRL_CONTESTANTS`; each one's SFTConfig arguments are recorded in its result):
  `trl-defaults` (SFTConfig's defaults: bf16 autocast, gradient checkpointing, lr 2e-5, padded
  batches), `trl-matched` (fp32, no checkpointing, our learning rate), `trl-padding-free` (matched +
  `padding_free=True`) and `trl-bfd-packing` (matched + `packing=True, packing_strategy="bfd"`: a step
  is `--batch` packed sequences of `--seq` tokens, so it trains ~4x the tokens of the others' steps).
  TRL documents padding-free (and so bfd packing) as supported with FlashAttention 2/3 only; that
  note is recorded beside those numbers (here they run on sdpa, which still keeps rows apart).

Every side runs `--rounds` times (default 2), interleaved, and keeps its best round (the least slowed
down by other work on the machine; every round's tokens/s and load average are recorded beside it).

Reported: tokens/s (real, non-pad tokens trained on per second of training, from the end of step
`--warmup` to the end of the last step), padding fraction, per-step training loss and peak RSS; the
ours/baseline ratios; ours against each TRL configuration and the fastest one (`vs_trl`), with the
goals (>= 1.5x its tokens/s, <= 0.8x its peak RSS, the same loss within noise) marked met / not met.
Results: bench/results/trainer-throughput.json (or --out). The machinery is shared with the GPU
benchmark (bench/_common.py); bench/trainer_gpu.py is the GPU half (bf16, 8B/0.5B shapes, MFU).

    python bench/trainer_throughput.py [--steps 12] [--rounds 2] [--batch 8] [--no-trl] [--out PATH]
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

from _common import (BASELINE_SETTINGS, ROOT, TRL_CONTESTANTS, TRL_SHARED_SETTINGS, compare_with_trl, default_rows, ratio,  # noqa: E402
                     row_lengths, run_rounds, spawn, versions, write_report)

MODEL = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 4,
         "num_key_value_heads": 4, "max_position_embeddings": 1024}
LENGTHS = {"dist": "uniform", "lo": 16, "hi": 256}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=0, help="steps left out of the timing (default 0, as in the recorded results)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--rows", type=int, default=600, help="at least this many rows (more when the packing side needs them)")
    ap.add_argument("--no-trl", action="store_true", help="leave out the TRL contestants")
    ap.add_argument("--rounds", type=int, default=2, help="run every side this many times, interleaved, and keep each one's best "
                                                         "(default 2: on a shared machine the load drifts between sides)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "trainer-throughput.json")
    ap.add_argument("--keep-work", action="store_true", help="keep the temporary model, data and logs")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-trainer-"))
    load = os.getloadavg()
    rows = max(args.rows, default_rows(args.steps, args.batch, seq=None if args.no_trl else args.seq, lengths=LENGTHS))
    assets = spawn("assets", {"model_dir": str(work / "model"), "data": str(work / "train.jsonl"), "seq": args.seq,
                              "model_config": MODEL, "precision": "fp32", "device": "cpu", "lengths": row_lengths(LENGTHS, rows)},
                   work, "cpu")
    common = {"model_dir": str(work / "model"), "data": str(work / "train.jsonl"), "steps": args.steps, "warmup": args.warmup,
              "batch": args.batch, "seq": args.seq, "precision": "fp32", "device": "cpu", "gradient_checkpointing": False,
              "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.05}
    names = ["baseline", "ours", *([] if args.no_trl else TRL_CONTESTANTS)]
    sides = run_rounds(names, common, work, "cpu", args.rounds, log=lambda m: print(f"[trainer_throughput] {m}", flush=True))
    for r in sides.values():
        r.pop("row_lengths", None)
    results = {"baseline": sides["baseline"], "ours": sides["ours"]}
    trl = {n: r for n, r in sides.items() if n in TRL_CONTESTANTS}
    b, o = results["baseline"], results["ours"]
    report = {
        "setup": {"model": "Llama-shaped, hidden 256, 4 layers, vocab 30522 (from config)", "lora": "r=16 on q,k,v,o,gate,up,down",
                  "steps": args.steps, "warmup_steps": args.warmup, "rounds": args.rounds, "micro_batch": args.batch, "max_seq_length": args.seq, "rows": rows,
                  "row_tokens": "16-256 (uniform)", "row_token_stats": assets["row_tokens"], "device": "cpu", "cpus": os.cpu_count(),
                  "python": platform.python_version(), "load_average_at_start": load, "load_average_at_end": os.getloadavg(), "versions": versions(),
                  "baseline_settings_differing_from_defaults": BASELINE_SETTINGS,
                  **({} if args.no_trl else {"trl_settings_shared": TRL_SHARED_SETTINGS})},
        **results,
        **({} if args.no_trl else {"trl": trl, "vs_trl": compare_with_trl(o, trl, gpu=False)}),
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
