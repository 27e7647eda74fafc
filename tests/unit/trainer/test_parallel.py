"""Pure pieces of distributed training: which strategy a job gets, and the bounded step history."""

from __future__ import annotations

import pytest
from finetune_api.spec import FSDP_AUTO_MIN_PARAMS, parse_spec
from pydantic import ValidationError

from finetune_trainer.parallel import DDP, FSDP, SINGLE, choose_strategy
from finetune_trainer.train import thin_history

BIG, SMALL = FSDP_AUTO_MIN_PARAMS, FSDP_AUTO_MIN_PARAMS - 1


@pytest.mark.parametrize("requested,method,world,params,expected", [
    ("auto", "full", 1, BIG, SINGLE),  # one process: nothing to share
    ("fsdp", "full", 1, BIG, SINGLE),
    ("auto", "full", 8, BIG, FSDP),  # large full fine-tunes shard by default
    ("auto", "full", 8, SMALL, DDP),  # small ones are faster as replicas
    ("auto", "lora", 8, 70 * BIG, DDP),  # adapters: few trainable parameters, replicas are cheap
    ("fsdp", "full", 2, SMALL, FSDP),  # asked for explicitly
    ("ddp", "full", 8, 70 * BIG, DDP),
])
def test_choose_strategy(requested, method, world, params, expected):
    assert choose_strategy(requested, method=method, world_size=world, total_params=params) == expected


def test_fsdp_is_refused_for_adapters_by_the_typed_model():
    base = {"model": {"uri": "s3://models/x"}, "dataset": {"train": "s3://data/x"}, "output": {"uri": "s3://out/x"},
            "hyperparameters": {"distributedStrategy": "fsdp"}}
    with pytest.raises(ValidationError, match="distributedStrategy fsdp needs method full"):
        parse_spec(base)
    assert parse_spec({**base, "method": "full"}).hyperparameters.distributed_strategy == "fsdp"
    assert parse_spec({k: v for k, v in base.items() if k != "hyperparameters"}).hyperparameters.distributed_strategy == "auto"


def test_thin_history_keeps_recent_steps_whole_and_halves_older_ones():
    entries = [{"step": i} for i in range(1, 11)]
    thin_history(entries, 10)
    assert len(entries) == 10  # at the limit: untouched
    entries.append({"step": 11})
    thin_history(entries, 10)
    # newest 5 kept whole; the 6 older ones halved (every other, starting with the first)
    assert [e["step"] for e in entries] == [1, 3, 5, 7, 8, 9, 10, 11]


def test_thin_history_stays_bounded_over_a_long_run_and_spans_it():
    entries: list[dict] = []
    for step in range(1, 100_001):
        entries.append({"step": step})
        thin_history(entries, 2000)
        assert len(entries) <= 2000
    steps = [e["step"] for e in entries]
    assert steps[0] == 1 and steps[-1] == 100_000 and steps == sorted(steps)
    assert steps[-1000:] == list(range(99_001, 100_001))  # the recent half at full resolution


def test_flash_attention_only_where_it_can_run(monkeypatch):
    import importlib.util

    import torch

    from finetune_trainer.model import attention_implementation

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert attention_implementation("bf16") is None  # CPU: transformers' default
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "flash_attn" else real(name, *a))
    assert attention_implementation("bf16") == "flash_attention_2"
    assert attention_implementation("fp16") == "flash_attention_2"
    assert attention_implementation("fp32") is None  # flash-attention needs 16-bit inputs
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flash_attn" else real(name, *a))
    assert attention_implementation("bf16") is None  # not installed: transformers' default (SDPA)
