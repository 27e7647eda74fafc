"""The GPU benchmark's FLOPs/MFU arithmetic, parameter counting, peak lookup and bookkeeping (no timing)."""

from __future__ import annotations

import pytest

import _common
import trainer_gpu as g

# A small Llama whose counts are easy by hand: hidden 8, 2 heads of 4 (1 KV head), MLP 16, vocab 32.
SMALL = {"model_type": "llama", "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
         "num_key_value_heads": 1, "vocab_size": 32, "max_position_embeddings": 64, "tie_word_embeddings": False}
# per layer: q 8x8=64, k 8x4=32, v 32, o 64, gate/up/down 3 x 8x16=384 -> 576; 2 layers + LM head 8x32=256
SMALL_MATMUL = 2 * 576 + 256
SMALL_TOTAL = SMALL_MATMUL + 256 + 2 * 2 * 8 + 8  # + input embedding + 2 norms per layer + final norm
# LoRA r=2: q 2(8+8)=32, k 2(8+4)=24, v 24, o 32, gate/up/down 3 x 2(8+16)=144 -> 256 per layer
SMALL_LORA_R2 = 2 * 256


def test_full_fine_tune_is_6n_plus_causal_attention():
    n, layers, d, length = 1000, 2, 8, 16
    attention = 12 * layers * d * length / 2  # PaLM's term, halved for the causal mask
    assert attention == 6 * layers * d * length == 1536
    assert g.model_flops_per_token(matmul_params=n, n_layers=layers, attn_dim=d, seq_len=length, method="full") == 6 * n + attention == 7536


def test_lora_counts_forward_and_activation_grads_of_the_base_and_full_training_of_the_adapter():
    n, lora, layers, d, length = 1000, 10, 2, 8, 16
    flops = g.model_flops_per_token(matmul_params=n, n_layers=layers, attn_dim=d, seq_len=length, lora_params=lora)
    assert flops == 2 * n + 2 * n + 6 * lora + 6 * layers * d * length == 5596
    full = g.model_flops_per_token(matmul_params=n, n_layers=layers, attn_dim=d, seq_len=length, method="full")
    assert flops < full


def test_unknown_method_is_rejected():
    with pytest.raises(ValueError):
        g.model_flops_per_token(matmul_params=1, n_layers=1, attn_dim=1, seq_len=1, method="qlora")


def test_rows_are_costed_at_their_own_length_not_the_packed_length():
    shape = {"matmul": 1000, "lora": 10, "n_layers": 2, "attn_dim": 8}
    per_token = g.model_flops_per_token(matmul_params=1000, n_layers=2, attn_dim=8, seq_len=100, lora_params=10)
    assert g.row_flops(100, shape) == 100 * per_token
    # Two packed rows of 100 cost their dense part like one row of 200, but a quarter less attention each.
    two = g.batch_flops([100, 100], shape)
    one = g.batch_flops([200], shape)
    assert two == 2 * g.row_flops(100, shape)
    assert one - two == 6 * 2 * 8 * (200**2 - 2 * 100**2)


def test_parameter_counts_of_a_hand_counted_config():
    shape = g.model_shape(g.build_config(SMALL), lora_r=2)
    assert shape == {"total": SMALL_TOTAL, "matmul": SMALL_MATMUL, "embedding": 256, "lora": SMALL_LORA_R2, "n_layers": 2, "attn_dim": 8}


def test_lora_count_matches_peft():
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_config(g.build_config(SMALL)),
                           LoraConfig(r=2, target_modules=_common.LORA_TARGETS, task_type="CAUSAL_LM"))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == SMALL_LORA_R2


def test_llama_8b_preset_has_the_llama_3_1_8b_parameter_count():
    shape = g.model_shape(g.build_config(g.PRESETS["llama-8b"].model_config), lora_r=16)
    assert shape["total"] == pytest.approx(8.03e9, rel=2e-3)
    assert shape["total"] == 8_030_261_248
    assert shape["matmul"] == shape["total"] - shape["embedding"] - (2 * 32 + 1) * 4096  # untied: the head is a matmul, the table is not
    assert shape["lora"] == 41_943_040  # r=16 on q,k,v,o,gate,up,down
    assert (shape["n_layers"], shape["attn_dim"]) == (32, 4096)
    # ~33.5 GFLOP per token of a 4096-token row: 4N = 30.0e9, adapters 0.25e9, attention 3.2e9.
    per_token = g.model_flops_per_token(matmul_params=shape["matmul"], n_layers=32, attn_dim=4096, seq_len=4096, lora_params=shape["lora"])
    assert per_token == pytest.approx(4 * 7_504_658_432 + 6 * 41_943_040 + 6 * 32 * 4096 * 4096)
    assert per_token == pytest.approx(33.5e9, rel=0.01)


def test_qwen_0_5b_preset_has_the_qwen2_0_5b_parameter_count():
    shape = g.model_shape(g.build_config(g.PRESETS["qwen-0.5b"].model_config), lora_r=16)
    assert shape["total"] == pytest.approx(0.494e9, rel=2e-3)
    assert shape["total"] == 494_032_768
    assert shape["embedding"] == 151936 * 896
    # Tied: the one table is counted once in total, and as the LM head matmul in N.
    assert shape["matmul"] > shape["total"] - shape["embedding"]
    assert shape["lora"] == 8_798_208


@pytest.mark.parametrize("name,peak", [
    ("NVIDIA H100 80GB HBM3", 989.4e12),
    ("NVIDIA H100 SXM5 80GB", 989.4e12),
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989.4e12),
    ("NVIDIA GH200 480GB", 989.4e12),
    ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA A100 80GB PCIe", 312e12),
])
def test_peak_by_device_name(name, peak):
    assert g.peak_flops(name)[0] == peak


def test_unknown_device_or_cpu_has_no_peak_unless_given():
    assert g.peak_flops("NVIDIA GeForce RTX 4090")[0] is None
    assert g.peak_flops("cpu")[0] is None
    assert g.peak_flops("cpu", override_tflops=123.0) == (123e12, "--peak-tflops")
    assert g.peak_flops("NVIDIA H100 80GB HBM3", override_tflops=500.0)[0] == 500e12


def test_cpu_runs_never_write_the_gpu_results(tmp_path, monkeypatch):
    monkeypatch.setattr(g.tempfile, "tempdir", str(tmp_path))  # the dry-run folder lands under tmp_path
    assert g.result_path("llama-8b", "cuda", None) == g.RESULTS_DIR / "trainer-gpu-llama-8b.json"
    dry = g.result_path("tiny", "cpu", None)
    assert dry.name == "trainer-gpu-tiny.json" and dry.parent.parent == tmp_path
    assert g.result_path("tiny", "cpu", tmp_path / "x.json") == tmp_path / "x.json"
    with pytest.raises(SystemExit):
        g.result_path("tiny", "cpu", g.RESULTS_DIR / "trainer-gpu-tiny.json")


def test_targets_say_met_not_met_or_not_measured_and_whether_they_apply():
    t = g.targets("llama-8b", "cuda", tps_ratio=1.6, ours_mfu=0.40, ours_padding=0.0)
    assert t["tokens_per_s_ours_over_baseline_at_least_1.5"]["status"] == "met"
    assert t["mfu_at_least_0.45"]["status"] == "not met" and t["mfu_at_least_0.45"]["applies_to_this_run"]
    assert t["padding_at_most_5_percent"]["met"] is True
    cpu = g.targets("tiny", "cpu", tps_ratio=2.0, ours_mfu=None, ours_padding=0.06)
    assert cpu["mfu_at_least_0.45"]["status"] == "not measured" and not cpu["mfu_at_least_0.45"]["applies_to_this_run"]
    assert not cpu["tokens_per_s_ours_over_baseline_at_least_1.5"]["applies_to_this_run"]
    assert cpu["padding_at_most_5_percent"]["status"] == "not met"
    oom = g.targets("llama-8b", "cuda", tps_ratio=None, ours_mfu=None, ours_padding=None)  # a side ran out of memory
    assert {v["status"] for v in oom.values()} == {"not measured"}


def test_a_side_that_failed_is_reported_as_is():
    failed = {"error": "out of memory", "detail": "torch.OutOfMemoryError: CUDA out of memory", "wall_s": 1.0}
    assert g.side_report(dict(failed), {"matmul": 1, "lora": 0, "n_layers": 1, "attn_dim": 1}, 1e12) == failed


def test_step_clock_counts_only_the_steps_after_warmup():
    clock = _common.StepClock(warmup=2, total=4)
    clock.begin()
    for real, computed in [(10, 20), (11, 20), (12, 16), (13, 13)]:
        clock.end_step(real, computed, [real])
    s = clock.summary()
    assert (s["timed_steps"], s["tokens"], s["row_lengths"]) == (2, 25, [12, 13])
    assert s["padding_fraction"] == pytest.approx(1 - 25 / 29)
    with pytest.raises(ValueError):
        _common.StepClock(warmup=4, total=4)
    unfinished = _common.StepClock(warmup=0, total=3)
    unfinished.begin()
    unfinished.end_step(1, 1, [1])
    with pytest.raises(RuntimeError):
        unfinished.summary()


def test_row_lengths_follow_the_distribution_and_are_reproducible():
    spec = {"dist": "lognormal", "median": 350, "sigma": 1.0, "lo": 16, "hi": 4096}
    lengths = _common.row_lengths(spec, 2000, seed=1)
    assert lengths == _common.row_lengths(spec, 2000, seed=1)
    assert min(lengths) >= 16 and max(lengths) <= 4096
    assert 300 < sorted(lengths)[1000] < 400  # median
    uniform = _common.row_lengths({"dist": "uniform", "lo": 16, "hi": 256}, 500)
    assert min(uniform) >= 16 and max(uniform) <= 256


def test_presets_fit_their_sequence_length():
    for preset in g.PRESETS.values():
        assert preset.model_config["max_position_embeddings"] >= preset.seq
        assert 0 < preset.warmup < preset.steps
    assert g.PRESETS["llama-8b"].seq == 4096 and g.PRESETS["llama-8b"].gradient_checkpointing
