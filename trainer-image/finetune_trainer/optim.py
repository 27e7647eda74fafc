"""The optimizer and the learning-rate schedule.

AdamW with weight decay on the weight matrices only: biases and normalisation parameters (anything 1-D,
or named ``*norm*``) get none, as in the usual transformer recipes. The schedule is transformers' named
schedule with ``warmupRatio`` of the planned steps as warm-up; the trainer steps it once per optimizer
step itself (accelerate's wrapper would step it once per process).
"""

from __future__ import annotations

from typing import Any

import torch
from finetune_api.spec import Hyperparameters


def build_optimizer(model: torch.nn.Module, hp: Hyperparameters) -> torch.optim.AdamW:
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    groups: list[dict[str, Any]] = [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=hp.learning_rate)


def build_scheduler(optimizer: torch.optim.Optimizer, hp: Hyperparameters, total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    from transformers import get_scheduler

    return get_scheduler(hp.lr_scheduler, optimizer, num_warmup_steps=int(round(hp.warmup_ratio * total_steps)),
                         num_training_steps=total_steps)
