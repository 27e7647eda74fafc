"""GPU trainer benchmark: our trainer against transformers Trainer + PEFT and TRL's SFTTrainer on real model shapes, with MFU.

The GPU half of bench/trainer_throughput.py, built on the same machinery (bench/_common.py): same
tokenizer (MiniLM's 30k WordPiece, built locally), same LoRA adapter and targets, same micro-batch and
number of optimizer steps on both sides, each side in its own process.

Presets (models initialised from a config, random weights, no hub access):

- ``llama-8b``: the Llama-3.1-8B shape (hidden 4096, 32 layers, 32 heads / 8 KV heads, MLP 14336,
  vocab 128256, rope_theta 500000, 131072 positions; Llama 3.1's long-context RoPE scaling is left
  out, it does not change the cost), LoRA r=16 on q,k,v,o,gate,up,down, max seq 4096, bf16, gradient
  checkpointing, micro-batch 4 (the baseline's worst case, 4 rows padded to 4096, keeps its fp32 logits
  and their gradient within an 80 GB H100).
- ``qwen-0.5b``: the Qwen2-0.5B shape (hidden 896, 24 layers, 14 heads / 2 KV heads, MLP 4864, vocab
  151936, tied embeddings), LoRA r=16, max seq 2048, bf16, gradient checkpointing, micro-batch 8
  (at 4096 the baseline's worst case, 8 rows x 4096 x 151936 fp32 logits plus their gradient, would
  not fit in 80 GB).
- ``tiny``: a ~4M-parameter Llama (vocab = the tokenizer's) that runs on CPU in seconds, to exercise
  this script without a GPU.

A preset keeps its real vocabulary even though the tokenizer has 30522 entries, so the embedding, the
LM head and the logits cost what they cost in the real model; the data just uses the first 30522 ids.

Data: text rows with realistic instruction-tuning lengths, log-normal with median 350 tokens and
sigma 1.0 (mean ~580, p90 ~1260, p99 ~3600), clipped to [16, max seq]. The baseline tokenises with
truncation and pads each micro-batch to its longest row (``DataCollatorForLanguageModeling``, the
default); ours packs each micro-batch padding-free into one row (``packing: true``; transformers'
``DataCollatorWithFlattening``, attention kept per original row). Note that ours packs the micro-batch's
rows, not rows up to ``max seq``: both sides train on exactly ``micro_batch`` rows per step.

Sides and settings: ours runs ``finetune_trainer`` with ``packing: true``, ``precision: bf16`` on cuda
(fp32 on CPU) and the preset's ``gradientCheckpointing``. The baseline is ``transformers.Trainer`` +
``peft.get_peft_model`` with ``TrainingArguments`` defaults except the settings listed in
``_common.BASELINE_SETTINGS`` (copied into the result file): the same micro-batch, steps, learning
rate and gradient checkpointing as ours, ``bf16=True`` on cuda, and no checkpoint saving or tracker
reporting. Its weights load in transformers' default dtype ("auto": the checkpoint's bf16), the LoRA
weights stay fp32 on both sides (peft's default), attention is transformers' default (sdpa) on both.

TRL contestants (``_common.TRL_CONTESTANTS``, ``--no-trl`` leaves them out): ``trl.SFTTrainer`` (the
version pinned in constraints.txt; ``pip install -c constraints.txt '.[bench]'``) as ``trl-defaults``
(SFTConfig's defaults: bf16 autocast, gradient checkpointing, lr 2e-5, fp32 weights, padded batches),
``trl-matched`` (bf16 weights and autocast, the preset's gradient checkpointing, our learning rate),
``trl-padding-free`` and ``trl-bfd-packing``, the same model, tokens, LoRA, micro-batch, steps, max
length and seed (``_common.TRL_SHARED_SETTINGS``). On cuda the last two ask for
``attn_implementation="flash_attention_2"`` when ``flash_attn`` is installed and ``use_liger_kernel``
when ``liger_kernel`` is (TRL's fastest setup; neither is in the pins: install them on the GPU machine);
each result records its SFTConfig arguments and the attention it ran, and the padding-free/packing ones
carry TRL's note that padding-free is documented for FlashAttention 2/3. ``vs_trl`` compares ours with
each and with the fastest (goal: >= 1.5x its tokens/s on GPU).

Measured per side (from the end of warmup step W to the end of the last step, device synchronised at
both ends): tokens/s of real (non-pad) tokens, padding fraction, peak GPU memory
(``torch.cuda.max_memory_allocated`` at the end of the last training step), peak RSS, MFU.

MFU (model FLOPs utilisation)
-----------------------------
MFU = model FLOPs of the rows trained on in the timed window / (window seconds x peak FLOP/s).

Notation: ``N`` = weights that take part in a matmul for every token: all linear layers of the
decoder plus the LM head (``d_model x vocab``, counted even when tied to the input embedding: the
output projection is a matmul, the embedding lookup is not). Embedding lookups, norms, biases,
activation functions, softmax and the loss are left out (well under 1 %). ``n_layers`` layers,
``d_attn = n_heads * head_dim`` (the query width: with GQA the score and value products still run per
query head), ``L`` = length of the row the token belongs to, ``N_lora = r * (d_in + d_out)`` summed over
the adapted linears.

Dense part, per token. Forward: 2N (a multiply and an add per weight). Backward: 2N for the
activation gradients (``dx = W^T dy``) plus 2N for the weight gradients (``dW = dy x^T``).

- full fine-tune: ``6 N``.
- LoRA: the frozen base gets no weight gradients, but its activation gradients are still computed
  (they carry the gradient down to the adapters of earlier layers): ``2N + 2N = 4N``. The adapters are
  trained like full weights: ``6 N_lora``. Total ``4 N + 6 N_lora``. (Layer 0's input gradient is not
  strictly needed; autograd computes it anyway with gradient checkpointing, and it is < 1/n_layers of
  the backward, so no correction is made.)

Attention part (no weights, identical for full and LoRA: both need the gradients with respect to Q, K
and V). Forward, per layer and row: ``Q K^T`` is ``2 L^2 d_attn`` and ``P V`` another ``2 L^2 d_attn``;
causal masking leaves half of it: ``2 L^2 d_attn``. The backward is twice the forward (``dP``, ``dV``
from ``dO``; ``dQ``, ``dK`` from ``dS``). Forward + backward: ``6 n_layers d_attn L^2`` per row, i.e.
``6 n_layers d_attn L`` per token -- PaLM's ``12 n_layers d L`` (Chowdhery et al. 2022, app. B) with
the causal halving. We count the causal half because flash / memory-efficient kernels skip the
masked blocks; the full square would credit work nobody has to do.

So per row of ``L`` tokens (:func:`row_flops`, built on :func:`model_flops_per_token`)::

    LoRA:  L * (4 N + 6 N_lora) + 6 n_layers d_attn L^2
    full:  L * 6 N              + 6 n_layers d_attn L^2

and the window's FLOPs are the sum over its rows. Packed rows: ``L`` is each original row's length,
never the packed length (attention does not cross rows). Padding tokens are not counted at all (model
FLOPs count real tokens only), so the baseline's padding shows up as lower MFU, not as extra credit.
Gradient-checkpointing recomputation (another forward, ~2N per token) is hardware work, not model
work, and is NOT counted: with LoRA + checkpointing the hardware does ~6N for 4N of model FLOPs, so
MFU 0.45 needs ~0.68 hardware utilisation.

Peak FLOP/s: dense bf16 tensor-core peak by ``torch.cuda.get_device_name`` (H100 SXM, H200: 989.4e12;
H100 PCIe: 756e12; H100 NVL / H200 NVL: 835e12; A100: 312e12), overridden by ``--peak-tflops``. On
CPU there is no meaningful peak: MFU is null unless ``--peak-tflops`` is given.

Targets recorded in the result (each marked met / not met / not measured, and whether it applies to
this run): ours/baseline tokens/s >= 1.5 (GPU), MFU >= 0.45 (llama-8b on GPU), ours' padding <= 5 %.

Results: on cuda bench/results/trainer-gpu-<preset>.json (or --out); on CPU only --out, by default a
new temporary folder, so a CPU dry run never overwrites a GPU result.

    python bench/trainer_gpu.py --preset llama-8b            # on an H100/H200
    python bench/trainer_gpu.py --preset tiny --device cpu --steps 5   # dry run here
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (BASELINE_SETTINGS, LORA_TARGETS, ROOT, TRL_CONTESTANTS, TRL_SHARED_SETTINGS, compare_with_trl, default_rows, length_stats, ratio,  # noqa: E402
                     row_lengths, run_rounds, spawn, versions, write_report)

RESULTS_DIR = ROOT / "bench" / "results"
INSTRUCTION_LENGTHS = {"dist": "lognormal", "median": 350, "sigma": 1.0, "lo": 16}  # "hi" = max seq


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    model_config: dict[str, Any]  # AutoConfig.for_model(model_type, **rest); vocab_size None = the tokenizer's
    seq: int
    batch: int
    steps: int
    warmup: int
    lengths: dict[str, Any] = field(default_factory=lambda: dict(INSTRUCTION_LENGTHS))
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    gradient_checkpointing: bool = True


PRESETS: dict[str, Preset] = {
    "llama-8b": Preset(
        "llama-8b", "Llama-3.1-8B shape (from LlamaConfig, random weights)",
        {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
         "num_key_value_heads": 8, "vocab_size": 128256, "rope_theta": 500000.0, "max_position_embeddings": 131072,
         "rms_norm_eps": 1e-5, "tie_word_embeddings": False},
        seq=4096, batch=4, steps=40, warmup=5),
    "qwen-0.5b": Preset(
        "qwen-0.5b", "Qwen2-0.5B shape (from Qwen2Config, random weights)",
        {"model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
         "num_key_value_heads": 2, "vocab_size": 151936, "rope_theta": 1000000.0, "max_position_embeddings": 32768,
         "rms_norm_eps": 1e-6, "tie_word_embeddings": True},
        seq=2048, batch=8, steps=40, warmup=5),
    "tiny": Preset(
        "tiny", "tiny Llama (~4M parameters, tokenizer vocab) to exercise the script on CPU",
        {"model_type": "llama", "hidden_size": 128, "intermediate_size": 344, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": None, "max_position_embeddings": 512, "tie_word_embeddings": True},
        seq=256, batch=8, steps=8, warmup=2, lengths={"dist": "lognormal", "median": 64, "sigma": 0.8, "lo": 16}),
}


# ------------------------------------------------------------------------------------------ FLOPs


def model_flops_per_token(*, matmul_params: int, n_layers: int, attn_dim: int, seq_len: float, lora_params: int = 0,
                          method: str = "lora") -> float:
    """Model FLOPs (forward + backward) to train on one token of a row of ``seq_len`` tokens.

    ``lora``: ``4 N + 6 N_lora + 6 n_layers d_attn L``; ``full``: ``6 N + 6 n_layers d_attn L`` (derivation in
    the module docstring). ``matmul_params`` is N (decoder linears + LM head), ``attn_dim`` is
    ``n_heads * head_dim``; gradient-checkpointing recomputation is not counted.
    """
    attention = 6 * n_layers * attn_dim * seq_len  # = 12 n_layers d L / 2 (causal)
    if method == "full":
        return 6 * matmul_params + attention
    if method == "lora":
        return 4 * matmul_params + 6 * lora_params + attention
    raise ValueError(f"method must be 'lora' or 'full', not {method!r}")


def row_flops(length: int, shape: dict[str, int], method: str = "lora") -> float:
    """Model FLOPs of training on one row of ``length`` tokens (attention within the row)."""
    return length * model_flops_per_token(matmul_params=shape["matmul"], n_layers=shape["n_layers"], attn_dim=shape["attn_dim"],
                                          seq_len=length, lora_params=shape.get("lora", 0), method=method)


def batch_flops(lengths: list[int], shape: dict[str, int], method: str = "lora") -> float:
    return float(sum(row_flops(n, shape, method) for n in lengths))


def build_config(model_config: dict[str, Any], vocab_size: int | None = None) -> Any:
    from transformers import AutoConfig

    kwargs = dict(model_config)
    model_type = kwargs.pop("model_type")
    kwargs["vocab_size"] = kwargs.get("vocab_size") or vocab_size
    if not kwargs["vocab_size"]:
        raise ValueError("vocab_size is needed (the preset leaves it to the tokenizer)")
    return AutoConfig.for_model(model_type, **kwargs)


def lora_param_count(model: Any, targets: list[str], r: int) -> int:
    """Parameters LoRA adds: ``r * (in + out)`` for every linear whose name ends in one of ``targets``."""
    import torch

    return sum(r * (m.in_features + m.out_features) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets)


def model_shape(config: Any, *, lora_r: int | None = 16, targets: list[str] = LORA_TARGETS) -> dict[str, int]:
    """Parameter counts of ``config``'s causal LM, from a weightless (meta device) instance.

    ``total``: every parameter once (tied embeddings once); ``matmul``: N of the FLOPs formula (linear
    weights, LM head included); ``embedding``: the input embedding table; ``lora``: adapter parameters
    for ``targets`` at rank ``lora_r``; ``n_layers``, ``attn_dim`` as in :func:`model_flops_per_token`.
    """
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return {
        "total": sum(p.numel() for p in model.parameters()),
        "matmul": sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)),
        "embedding": model.get_input_embeddings().weight.numel(),
        "lora": lora_param_count(model, targets, lora_r) if lora_r else 0,
        "n_layers": config.num_hidden_layers,
        "attn_dim": config.num_attention_heads * head_dim,
    }


# Dense (no sparsity) bf16 tensor-core peak by device name; the first matching substring wins.
PEAK_BF16_FLOPS: list[tuple[str, float]] = [
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H200 NVL", 835e12),
    ("H100", 989.4e12),  # SXM5, e.g. "NVIDIA H100 80GB HBM3"
    ("H200", 989.4e12),  # SXM, "NVIDIA H200"; also GH200
    ("A100", 312e12),  # SXM4 and PCIe alike
]


def peak_flops(device_name: str, override_tflops: float | None = None) -> tuple[float | None, str]:
    """(peak FLOP/s, where it came from); (None, why) when unknown, e.g. on CPU."""
    if override_tflops:
        return override_tflops * 1e12, "--peak-tflops"
    name = device_name.lower()
    for key, flops in PEAK_BF16_FLOPS:
        if key.lower() in name:
            return flops, f"dense bf16 peak of {key}"
    return None, f"no known peak for {device_name!r}; pass --peak-tflops"


# ------------------------------------------------------------------------------------------ report


def result_path(preset: str, device: str, out: Path | None) -> Path:
    """Where the result goes: GPU runs default to bench/results; CPU runs never write there."""
    gpu_path = RESULTS_DIR / f"trainer-gpu-{preset}.json"
    if device != "cuda":
        if out is None:
            return Path(tempfile.mkdtemp(prefix="bench-trainer-gpu-dry-")) / gpu_path.name
        if out.resolve().parent == RESULTS_DIR.resolve() and out.name.startswith("trainer-gpu-"):
            raise SystemExit(f"refusing to write a {device} run to {out}: that path holds GPU results")
        return out
    return out or gpu_path


def _target(value: float | None, threshold: float, *, at_least: bool, applies: bool, note: str) -> dict[str, Any]:
    met = None if value is None else (value >= threshold if at_least else value <= threshold)
    return {"threshold": threshold, "comparison": ">=" if at_least else "<=", "value": value,
            "status": "not measured" if met is None else ("met" if met else "not met"), "met": met,
            "applies_to_this_run": applies, "note": note}


def targets(preset: str, device: str, tps_ratio: float | None, ours_mfu: float | None, ours_padding: float | None) -> dict[str, Any]:
    gpu = device == "cuda"
    return {
        "tokens_per_s_ours_over_baseline_at_least_1.5": _target(
            tps_ratio, 1.5, at_least=True, applies=gpu, note="GPU target" + ("" if gpu else "; this was a CPU run, so it does not count")),
        "mfu_at_least_0.45": _target(
            ours_mfu, 0.45, at_least=True, applies=gpu and preset == "llama-8b",
            note="llama-8b on GPU; model FLOPs per the module docstring (LoRA-aware, causal attention, no recompute)"),
        "padding_at_most_5_percent": _target(ours_padding, 0.05, at_least=False, applies=True, note="ours (packing)"),
    }


def side_report(r: dict[str, Any], shape: dict[str, int], peak: float | None) -> dict[str, Any]:
    if "error" in r:  # e.g. out of GPU memory: nothing was measured
        return r
    lengths = r.pop("row_lengths")
    flops = batch_flops(lengths, shape)
    achieved = flops / r["seconds"]
    return {**r, "rows_trained": len(lengths), "row_tokens_trained": length_stats(lengths), "model_flops": flops,
            "model_tflops_per_s": achieved / 1e12, "mfu": achieved / peak if peak else None}


# -------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="llama-8b")
    ap.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when available")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per side, warmup included (preset default)")
    ap.add_argument("--warmup", type=int, default=None, help="steps left out of the timing (preset default, at most steps-1)")
    ap.add_argument("--batch", type=int, default=None, help="micro-batch rows (preset default)")
    ap.add_argument("--seq", type=int, default=None, help="max sequence length (preset default)")
    ap.add_argument("--rows", type=int, default=None, help="rows of data (default: enough for one epoch)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="peak FLOP/s for MFU, in TFLOP/s (default: by GPU name)")
    ap.add_argument("--out", type=Path, default=None,
                    help="result file (default: bench/results/trainer-gpu-<preset>.json on cuda, a new temp folder on CPU)")
    ap.add_argument("--work-dir", type=Path, default=None, help="where the model and data go (the 8B model is 16 GB; default: a temp folder)")
    ap.add_argument("--keep-work", action="store_true", help="keep the model, data and child logs")
    ap.add_argument("--no-trl", action="store_true", help="leave out the TRL contestants")
    ap.add_argument("--rounds", type=int, default=1, help="run every side this many times, interleaved, keeping each one's best")
    args = ap.parse_args(argv)

    import torch

    preset = PRESETS[args.preset]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device is visible")
    out = result_path(preset.name, device, args.out)
    precision = "bf16" if device == "cuda" else "fp32"
    steps = args.steps or preset.steps
    warmup = min(preset.warmup if args.warmup is None else args.warmup, steps - 1)
    batch, seq = args.batch or preset.batch, args.seq or preset.seq
    lengths_spec = {"hi": seq, **preset.lengths}
    rows = args.rows or default_rows(steps, batch, seq=None if args.no_trl else seq, lengths=lengths_spec)

    if args.work_dir:
        args.work_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-trainer-gpu-", dir=args.work_dir))  # ours alone: removed at the end
    model_dir, data = work / "model", work / "train.jsonl"
    print(f"[trainer_gpu] preset {preset.name} on {device} ({precision}), work dir {work}", flush=True)
    assets = spawn("assets", {"model_dir": str(model_dir), "data": str(data), "seq": seq, "model_config": preset.model_config,
                              "precision": precision, "device": device, "lengths": row_lengths(lengths_spec, rows)}, work, device)
    print(f"[trainer_gpu] assets: {assets['params'] / 1e6:.1f}M parameters, rows {assets['row_tokens']}", flush=True)
    common = {"model_dir": str(model_dir), "data": str(data), "steps": steps, "warmup": warmup, "batch": batch, "seq": seq,
              "precision": precision, "device": device, "gradient_checkpointing": preset.gradient_checkpointing,
              "lora_r": preset.lora_r, "lora_alpha": preset.lora_alpha, "lora_dropout": preset.lora_dropout}
    names = ["baseline", "ours", *([] if args.no_trl else TRL_CONTESTANTS)]
    raw = run_rounds(names, common, work, device, args.rounds, tolerate_oom=device == "cuda",
                     log=lambda m: print(f"[trainer_gpu] {m}", flush=True))
    trl_raw = {n: r for n, r in raw.items() if n in TRL_CONTESTANTS}

    shape = model_shape(build_config(preset.model_config, assets["model_vocab"]), lora_r=preset.lora_r)
    device_name = next((r["device_name"] for r in raw.values() if "device_name" in r), "cpu" if device == "cpu" else "unknown")
    peak, peak_source = peak_flops(device_name, args.peak_tflops) if (device == "cuda" or args.peak_tflops) else (None, "CPU: no meaningful peak (pass --peak-tflops)")
    b, o = (side_report(raw[w], shape, peak) for w in ("baseline", "ours"))
    trl = {name: side_report(r, shape, peak) for name, r in trl_raw.items()}
    for side in (b, o, *trl.values()):
        if "trainable_params" in side and side["trainable_params"] != shape["lora"]:
            print(f"[trainer_gpu] note: trainable parameters {side['trainable_params']} != LoRA count {shape['lora']}", flush=True)
    tps_ratio = ratio(o.get("tokens_per_s"), b.get("tokens_per_s"))
    report = {
        "preset": preset.name,
        "status": "GPU result" if device == "cuda" else "CPU dry run: exercises the script; the numbers are not GPU results",
        "setup": {
            "description": preset.description, "model_config": {**preset.model_config, "vocab_size": assets["model_vocab"]},
            "tokenizer": f"MiniLM WordPiece, {assets['tokenizer_vocab']} tokens (ids drawn below that)",
            "params": shape, "lora": {"r": preset.lora_r, "alpha": preset.lora_alpha, "dropout": preset.lora_dropout, "targets": LORA_TARGETS},
            "max_seq_length": seq, "micro_batch": batch, "steps": steps, "warmup_steps": warmup, "rows": rows, "rounds": args.rounds,
            "row_length_distribution": lengths_spec, "row_tokens": assets["row_tokens"], "precision": precision,
            "gradient_checkpointing": preset.gradient_checkpointing, "device": device, "device_name": device_name,
            "peak_flops": peak, "peak_flops_source": peak_source, "cpus": os.cpu_count(), "python": platform.python_version(),
            "versions": versions(),
            "flops_formula": "per row of L tokens: L*(4N + 6N_lora) + 6*n_layers*d_attn*L^2 (LoRA; causal attention, per original row; "
                             "no recompute; padding not counted); see bench/trainer_gpu.py",
            "baseline_settings_differing_from_defaults": BASELINE_SETTINGS,
            **({} if args.no_trl else {"trl_settings_shared": TRL_SHARED_SETTINGS}),
        },
        "baseline": b,
        "ours": o,
        **({} if args.no_trl else {"trl": trl, "vs_trl": compare_with_trl(o, trl, gpu=device == "cuda")}),
        "ratios_ours_over_baseline": {k: ratio(o.get(f), b.get(f)) for k, f in (
            ("tokens_per_s", "tokens_per_s"), ("mfu", "mfu"), ("peak_gpu_mem", "peak_gpu_mem_mb"), ("peak_rss", "peak_rss_mb"))},
        "targets": targets(preset.name, device, tps_ratio, o.get("mfu"), o.get("padding_fraction")),
    }
    write_report(out, report)
    print(json.dumps(report, indent=2))
    print(f"[trainer_gpu] wrote {out}", flush=True)
    if args.keep_work:
        pass
    elif any("error" in r for r in raw.values()):  # keep the child logs, drop the (large) model
        shutil.rmtree(model_dir, ignore_errors=True)
        print(f"[trainer_gpu] a side failed; logs kept in {work}", flush=True)
    else:
        shutil.rmtree(work, ignore_errors=True)
    return report


if __name__ == "__main__":
    main()
