"""Where this process sits in the training group, read from the torchrun environment.

torchrun sets RANK, LOCAL_RANK, WORLD_SIZE and LOCAL_WORLD_SIZE; a plain ``python -m finetune_trainer``
is rank 0 of 1. The process group itself is created by accelerate (NCCL on GPU, gloo on CPU); the
helpers here only wrap the few collectives the trainer needs so a single process never touches
torch.distributed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Global rank 0: the only writer of shared artifacts (checkpoints, progress, model)."""
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        """Local rank 0: does per-node work such as downloading the base model to the node's cache."""
        return self.local_rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def dist_info() -> DistInfo:
    env = os.environ
    return DistInfo(
        rank=int(env.get("RANK", 0)),
        local_rank=int(env.get("LOCAL_RANK", 0)),
        world_size=int(env.get("WORLD_SIZE", 1)),
        local_world_size=int(env.get("LOCAL_WORLD_SIZE", env.get("WORLD_SIZE", 1))),
    )


def _initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if _initialized():
        import torch.distributed as dist

        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s value on every rank (a no-op without a process group)."""
    if not _initialized():
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's value, in rank order, on every rank."""
    if not _initialized():
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _collective_device() -> Any:
    """Where a tensor for a collective must live: the current GPU under NCCL, else the CPU (gloo)."""
    import torch
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on at least one (e.g. one rank got SIGTERM)."""
    if not _initialized():
        return flag
    import torch
    import torch.distributed as dist

    t = torch.tensor([1 if flag else 0], device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def all_reduce_sum(value: float) -> float:
    """The sum of ``value`` over all ranks, on every rank (float64)."""
    if not _initialized():
        return value
    import torch
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item())
