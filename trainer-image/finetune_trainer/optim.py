"""The optimizer and the learning-rate schedule.

AdamW with weight decay on the weight matrices only: biases and normalisation parameters (anything 1-D,
or named ``*norm*``) get none, as in the usual transformer recipes. The schedule is transformers' named
schedule with ``warmupRatio`` of the planned steps as warm-up; the trainer steps it once per optimizer
step itself (accelerate's wrapper would step it once per process). When a resume changes the planned
steps (another world size, see :func:`.resume.remap_position`), :func:`reschedule` rebuilds the schedule
for the new total at the step it had reached.
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


def reschedule(scheduler: torch.optim.lr_scheduler.LRScheduler, hp: Hyperparameters, total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """The schedule for ``total_steps`` planned steps, at the position ``scheduler`` had reached.

    Warm-up and decay follow the new total: the learning rate from here on is that of a fresh
    :func:`build_scheduler` for ``total_steps`` stepped as often as ``scheduler`` was (its
    ``last_epoch``, which skips the steps an fp16 overflow skipped). The optimizer's learning rate is set
    to the new schedule's value for the current step.
    """
    optimizer = scheduler.optimizer  # the one it steps (not accelerate's wrapper)
    fresh = build_scheduler(optimizer, hp, total_steps)  # base_lrs from the optimizer's initial_lr: the configured rate
    fresh.last_epoch = scheduler.last_epoch
    lrs = [base * fn(fresh.last_epoch) for base, fn in zip(fresh.base_lrs, fresh.lr_lambdas)]
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    fresh._last_lr = lrs  # what get_last_lr() reports until the next step
    return fresh
