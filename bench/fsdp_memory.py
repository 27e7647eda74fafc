"""Memory per process of a full fine-tune: FSDP2 against DDP, same model, data and steps, in one run.

A full fine-tune with AdamW keeps 16 bytes per parameter (fp32 weights, gradients and two moments). DDP
holds all of it in every process; FSDP shards it, so each of W processes holds about 1/W of it (plus
one transformer block gathered at a time). This benchmark trains the same Llama-shaped model (from a
config, ~134M parameters) for the same steps with ``distributedStrategy: ddp`` and then ``fsdp``, two
processes under torchrun each (gloo on CPU, NCCL on GPU), and records for every process the
training state it holds after the last step (weights + gradients + AdamW moments, counted from its
tensors: local shards under FSDP) and its peak RSS (``ru_maxrss``; on CUDA also
``max_memory_allocated``). Peak RSS also holds the interpreter and libraries (~0.9 GB here),
activations, communication buffers and what the allocator keeps, so it falls by less than the state.

What to read: rank 1. Under FSDP only rank 0 reads the base weights and gathers checkpoints (see
``finetune_trainer/parallel.py``), so rank 0's peak includes one full copy of the model in CPU RAM at
those moments, by design; rank 1 never holds more than its shard plus the block being gathered.

    python bench/fsdp_memory.py [--steps 4] [--out bench/results/fsdp-memory.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import ROOT, row_lengths, spawn, write_report  # noqa: E402

MODEL = {"model_type": "llama", "hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 12,
         "num_key_value_heads": 12, "max_position_embeddings": 1024}


def _worker(config: str) -> None:
    """One torchrun process: the real trainer, then this process's peak memory on one RESULT line."""
    from finetune_trainer import train as T
    from finetune_trainer.__main__ import main

    held: dict[str, float] = {}
    finish = T.Trainer._finish

    def measured_finish(self):  # after the last step: what this process holds of the training state
        def local_bytes(t):
            t = t.to_local() if hasattr(t, "to_local") else t
            return t.numel() * t.element_size()

        params = [p for p in self.raw_model.parameters() if p.requires_grad]
        weights = sum(local_bytes(p) for p in params)
        moments = sum(local_bytes(v) for state in self.optimizer.optimizer.state.values() for v in state.values()
                      if hasattr(v, "numel") and v.dim() > 0)
        held["training_state_mb"] = (2 * weights + moments) / 2**20  # weights + gradients (same size) + AdamW moments
        return finish(self)

    T.Trainer._finish = measured_finish
    code = main(["--config", config])
    result = {"rank": int(os.environ.get("RANK", 0)), "exit": code, **held,
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    import torch

    if torch.cuda.is_available():
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print("RESULT " + json.dumps(result), flush=True)
    sys.exit(code)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(strategy: str, work: Path, model_dir: Path, data: Path, steps: int, seq: int, batch: int) -> dict:
    import yaml

    out = work / strategy
    spec = {
        "model": {"uri": str(model_dir)},
        "method": "full",
        "dataset": {"train": str(data), "format": "text", "split": {"validation": 0.01, "test": 0.01}, "leakageCheck": "off",
                    "preprocessing": {"dedupe": {"exact": False, "near": False}, "redactPii": False}},
        "hyperparameters": {"maxSteps": steps, "batchSize": batch, "maxSeqLength": seq, "packing": True, "learningRate": 1e-4,
                            "seed": 0, "distributedStrategy": strategy},
        "evaluation": {"everySteps": 100000, "baseline": False, "useBestModel": False},
        "checkpoint": {"everySteps": 100000, "keepLast": 1, "resume": "none"},
        "output": {"uri": str(out / "output")},
    }
    out.mkdir(parents=True, exist_ok=True)
    cfg = out / "job.yaml"
    cfg.write_text(yaml.safe_dump({"apiVersion": "finetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": f"mem-{strategy}"}, "spec": spec}))
    env = {**os.environ, "FINETUNE_METRICS_PORT": "0", "FINETUNE_WORK_DIR": str(out / "work"), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "FINETUNE_TERMINATION_LOG": str(out / "termination-log"), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), str(Path(__file__).resolve()), "--worker", str(cfg)]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=str(ROOT))
    wall = time.monotonic() - t0
    (out / "torchrun.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"{strategy} run failed (exit {proc.returncode}); see {out / 'torchrun.log'}\n{proc.stderr[-2000:]}")
    ranks = sorted((json.loads(line.split("RESULT ", 1)[1]) for line in (proc.stdout + proc.stderr).splitlines() if "RESULT {" in line),
                   key=lambda r: r["rank"])
    return {"wall_s": round(wall, 1), "ranks": ranks}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "fsdp-memory.json")
    args = ap.parse_args()
    if args.worker:
        _worker(args.worker)
        return
    work = Path(tempfile.mkdtemp(prefix="bench-fsdp-"))
    try:
        rows = 400
        assets = spawn("assets", {"model_dir": str(work / "model"), "data": str(work / "train.jsonl"), "seq": args.seq, "model_config": MODEL,
                                  "precision": "fp32", "device": "cpu", "lengths": row_lengths({"dist": "uniform", "lo": 32, "hi": args.seq}, rows)},
                       work, "cpu")
        results = {s: _run(s, work, work / "model", work / "train.jsonl", args.steps, args.seq, args.batch) for s in ("ddp", "fsdp")}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    params = assets["params"]
    state_mb = 16 * params / 2**20  # fp32 weights + grads + AdamW moments
    by = {s: {r["rank"]: r for r in results[s]["ranks"]} for s in results}
    report = {
        "setup": {"model": f"Llama-shaped from config, {params / 1e6:.0f}M parameters", "method": "full", "processes": 2,
                  "steps": args.steps, "micro_batch": args.batch, "max_seq_length": args.seq, "device": "cpu",
                  "cpus": os.cpu_count(), "python": platform.python_version(),
                  "training_state_mb_unsharded": round(state_mb)},
        "ddp": results["ddp"],
        "fsdp": results["fsdp"],
        "ratios_fsdp_over_ddp": {
            "rank1_training_state": round(by["fsdp"][1]["training_state_mb"] / by["ddp"][1]["training_state_mb"], 3),
            "rank1_peak_rss": round(by["fsdp"][1]["peak_rss_mb"] / by["ddp"][1]["peak_rss_mb"], 3),
            "rank0_peak_rss": round(by["fsdp"][0]["peak_rss_mb"] / by["ddp"][0]["peak_rss_mb"], 3),
        },
        "rank1_saved_mb": round(by["ddp"][1]["peak_rss_mb"] - by["fsdp"][1]["peak_rss_mb"]),
        "expected_saving_mb": round(state_mb / 2),
    }
    write_report(args.out, report)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
