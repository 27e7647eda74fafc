"""The trainer benchmarks' TRL contestants, run for real on a tiny model (in-process, a few steps each).

Checks what the timing rests on: every side counts the same real tokens for the same rows, whether its
batches are padded or padding-free, each TRL configuration gets the SFTConfig arguments it is recorded
with, per-step losses come back, and the comparison arithmetic marks the goals as it should.
"""

from __future__ import annotations

import pytest

import _common as c

TINY = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
        "num_key_value_heads": 2, "max_position_embeddings": 128}
STEPS, BATCH, SEQ = 3, 4, 64


@pytest.fixture(scope="module")
def sides(tmp_path_factory, monkeypatch_module):
    monkeypatch_module.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch_module.setenv("HF_HUB_OFFLINE", "1")
    work = tmp_path_factory.mktemp("trl-bench")
    assets = c.build_assets({"model_dir": str(work / "model"), "data": str(work / "rows.jsonl"), "seq": SEQ, "model_config": TINY,
                             "precision": "fp32", "device": "cpu", "lengths": c.row_lengths({"dist": "uniform", "lo": 8, "hi": 40}, 48)})
    common = {"model_dir": str(work / "model"), "data": str(work / "rows.jsonl"), "steps": STEPS, "warmup": 0, "batch": BATCH, "seq": SEQ,
              "precision": "fp32", "device": "cpu", "gradient_checkpointing": False, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0}
    out = {"baseline": c.run_baseline({**common, "out": str(work / "baseline")})}
    for name in c.TRL_CONTESTANTS:
        out[name] = c.trl_report(name, c.run_trl({**common, "out": str(work / name), "trl": name}))
    return assets, common, out


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_every_side_trains_the_steps_and_reports_a_loss_per_step(sides):
    _, _, out = sides
    for name, r in out.items():
        assert r["timed_steps"] == STEPS, name
        assert len(r["losses"]) == STEPS and all(9 < loss < 11 for loss in r["losses"]), (name, r["losses"])  # ln(30522) = 10.3
        assert r["tokens"] == sum(r["row_lengths"]) and r["tokens_per_s"] > 0, name
        assert r["trainable_params"] > 0, name


def test_padded_and_padding_free_sides_count_the_same_tokens_for_the_same_rows(sides):
    _, _, out = sides
    base, matched, free = out["baseline"], out["trl-matched"], out["trl-padding-free"]
    assert base["padding_fraction"] > 0 and matched["padding_fraction"] > 0 and free["padding_fraction"] == 0
    # Same seed, same sampler, same token ids: the same rows per step, counted alike.
    assert base["row_lengths"] == matched["row_lengths"] == free["row_lengths"] == out["trl-defaults"]["row_lengths"]
    assert base["tokens"] == matched["tokens"] == free["tokens"]
    assert base["losses"][0] == pytest.approx(matched["losses"][0], rel=1e-4)
    assert matched["losses"] == pytest.approx(free["losses"], rel=1e-4)  # sdpa keeps the flattened rows apart


def test_bfd_packing_trains_packed_sequences_of_whole_rows(sides):
    _, _, out = sides
    packed = out["trl-bfd-packing"]
    assert packed["padding_fraction"] == 0 and packed["packed_sequences_per_step"] == BATCH
    assert len(packed["row_lengths"]) > STEPS * BATCH  # more rows per step than the unpacked sides
    assert max(packed["row_lengths"]) <= SEQ


def test_each_configuration_records_its_sftconfig_and_the_flash_attention_note(sides):
    _, common, out = sides
    for name, r in out.items():
        if name == "baseline":
            continue
        assert r["sftconfig"] == c.trl_sftconfig_kwargs(name, common)
        assert r["attn_implementation"] == "sdpa" and r["trl_version"]
        assert ("flash_attention_note" in r) == (c.TRL_CONTESTANTS[name]["mode"] != "padded"), name
    assert "bf16" not in out["trl-defaults"]["sftconfig"] and "gradient_checkpointing" not in out["trl-defaults"]["sftconfig"]
    assert out["trl-matched"]["sftconfig"]["bf16"] is False and out["trl-matched"]["sftconfig"]["learning_rate"] == c.LEARNING_RATE
    assert out["trl-padding-free"]["sftconfig"]["padding_free"] is True and out["trl-padding-free"]["sftconfig"]["max_length"] is None
    assert out["trl-bfd-packing"]["sftconfig"]["packing_strategy"] == "bfd"
    assert all(r["sftconfig"].get("use_cpu") for n, r in out.items() if n != "baseline")


def test_flash_attention_and_liger_are_asked_for_only_on_cuda_when_installed(monkeypatch):
    import importlib.util

    p = {"device": "cuda", "precision": "bf16", "batch": 4, "steps": 3, "seq": 64, "gradient_checkpointing": True}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if name in ("flash_attn", "liger_kernel") else None)
    free = c.trl_sftconfig_kwargs("trl-padding-free", p)
    assert free["model_init_kwargs"] == {"dtype": "bfloat16", "attn_implementation": "flash_attention_2"} and free["use_liger_kernel"]
    assert "attn_implementation" not in c.trl_sftconfig_kwargs("trl-matched", p)["model_init_kwargs"]
    assert "model_init_kwargs" not in c.trl_sftconfig_kwargs("trl-defaults", p) and "use_cpu" not in free
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert "use_liger_kernel" not in c.trl_sftconfig_kwargs("trl-bfd-packing", p)


def test_compare_with_trl_picks_the_fastest_and_marks_the_goals():
    ours = {"tokens_per_s": 600.0, "peak_rss_mb": 1800.0, "losses": [10.0, 9.0, 8.0, 8.2]}
    trl = {"trl-defaults": {"tokens_per_s": 70.0, "peak_rss_mb": 3000.0, "losses": [10.0, 9.9, 9.8, 9.7]},
           "trl-matched": {"tokens_per_s": 200.0, "peak_rss_mb": 3400.0, "losses": [10.0, 9.0, 8.1, 8.1]},
           "trl-padding-free": {"tokens_per_s": 330.0, "peak_rss_mb": 2500.0, "losses": [10.0, 9.0, 8.0, 8.3]},
           "trl-bfd-packing": {"error": "out of memory"}}
    v = c.compare_with_trl(ours, trl, gpu=False)
    assert v["best_trl"] == "trl-padding-free" and "trl-bfd-packing" not in v["per_configuration"]
    assert v["ours_over_best_trl"] == {"tokens_per_s": pytest.approx(600 / 330), "peak_rss": pytest.approx(1800 / 2500)}
    g = v["goals"]
    assert g["tokens_per_s_over_best_trl_at_least_1.5"]["status"] == "met"
    assert g["peak_rss_over_best_trl_at_most_0.8"]["status"] == "met"
    # second half: ours 8.0, 8.2 (mean 8.1, std 0.141); padding-free 8.0, 8.3 (mean 8.15): 0.35 stds apart
    lc = v["loss_comparison"]
    assert lc["ours_mean"] == pytest.approx(8.1) and lc["vs"]["trl-padding-free"]["ours_minus_theirs"] == pytest.approx(-0.05)
    assert g["same_loss_within_noise"]["status"] == "met" and g["same_loss_within_noise"]["value"] == pytest.approx(0.05 / 0.1414, rel=1e-3)
    slow = c.compare_with_trl({**ours, "tokens_per_s": 400.0}, trl, gpu=True)
    assert slow["goals"]["tokens_per_s_over_best_trl_at_least_1.5"]["status"] == "not met"
    assert set(slow["goals"]) == {"tokens_per_s_over_best_trl_at_least_1.5"}  # RSS and loss goals are the CPU run's


def test_rows_suffice_for_bfd_packing_in_one_epoch():
    lengths = {"dist": "uniform", "lo": 16, "hi": 256}
    rows = c.default_rows(30, 8, seq=512, lengths=lengths)
    assert rows * 136 >= 30 * 8 * 512  # mean row 136 tokens: enough for 30 steps of 8 packed 512-token sequences
    assert c.default_rows(30, 8) < rows
