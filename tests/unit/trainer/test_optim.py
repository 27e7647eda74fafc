"""The LR schedule follows the planned steps, also after a resume that remapped them (issue 10 §4)."""

from __future__ import annotations

import pytest
import torch
from finetune_api.spec import Hyperparameters

from finetune_trainer.optim import build_scheduler, reschedule


def _hp(scheduler: str) -> Hyperparameters:
    return Hyperparameters.model_validate({"learningRate": 0.01, "lrScheduler": scheduler, "warmupRatio": 0.3})


def _optimizer(hp: Hyperparameters) -> torch.optim.Optimizer:
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.ones(2)
    return torch.optim.AdamW([p], lr=hp.learning_rate)


def _steps(sched: torch.optim.lr_scheduler.LRScheduler, n: int) -> list[float]:
    """The rate each of ``n`` optimizer steps uses, then the one reported after the last."""
    used = []
    for _ in range(n):
        used.append(sched.optimizer.param_groups[0]["lr"])
        sched.optimizer.step()
        sched.step()
    return [*used, sched.get_last_lr()[0]]


def _resumed(hp: Hyperparameters, *, rebuild: bool) -> torch.optim.lr_scheduler.LRScheduler:
    """3 steps done on 2 ranks of a run planned for 8 steps, resumed on 1 rank: the remap says 13 steps in
    all, while setup built its schedule for a fresh run at the new size (16 steps)."""
    old = build_scheduler(_optimizer(hp), hp, 8)
    _steps(old, 3)
    sched = build_scheduler(_optimizer(hp), hp, 16)
    sched.optimizer.load_state_dict(old.optimizer.state_dict())
    sched.load_state_dict(old.state_dict())  # what the checkpoint restores
    return reschedule(sched, hp, 13) if rebuild else sched


@pytest.mark.parametrize("scheduler", ["cosine", "linear", "polynomial", "constant_with_warmup"])
def test_a_resume_at_another_world_size_continues_on_a_fresh_schedule_for_the_remapped_total(scheduler):
    hp = _hp(scheduler)
    rebuilt = _resumed(hp, rebuild=True)
    fresh = build_scheduler(_optimizer(hp), hp, 13)
    _steps(fresh, 3)
    assert rebuilt.last_epoch == fresh.last_epoch == 3
    assert rebuilt.get_last_lr() == pytest.approx(fresh.get_last_lr())
    # The next 10 updates (steps 4-13) use the rates of a fresh 13-step schedule, warm-up included.
    assert _steps(rebuilt, 10) == pytest.approx(_steps(fresh, 10))


def test_without_the_rebuild_the_restored_schedule_follows_the_setup_total():
    """Before: the checkpoint's scheduler state carries no total, so the 16 steps of setup decided the rates."""
    hp = _hp("cosine")
    fresh = build_scheduler(_optimizer(hp), hp, 13)
    _steps(fresh, 3)
    assert _steps(_resumed(hp, rebuild=False), 10) != pytest.approx(_steps(fresh, 10))
