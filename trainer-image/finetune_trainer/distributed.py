"""Where this process sits in the training group, read from the torchrun environment.

torchrun sets RANK, LOCAL_RANK, WORLD_SIZE and LOCAL_WORLD_SIZE; a plain ``python -m finetune_trainer``
is rank 0 of 1. The process group itself is created by accelerate (NCCL on GPU, gloo on CPU); the
helpers here only wrap the few collectives the trainer needs so a single process never touches
torch.distributed, plus :func:`local_main_works`, the one way per-node work (a model download, data
preparation) is done once by local rank 0 while the pod's other processes wait for it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from . import errors

T = TypeVar("T")


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


def world_size() -> int:
    """Processes in the group (1 without one)."""
    if not _initialized():
        return 1
    import torch.distributed as dist

    return dist.get_world_size()


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


# ------------------------------------------------------------------------------ once per node


def launch_key() -> str:
    """The same on every local rank of one torchrun launch, different for the next launch.

    Named after the torchrun agent (the parent all local ranks share) and its restart count, so a marker
    left by an earlier launch on the same volume is never read as this one's.
    """
    return f"{os.getppid()}-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"


def local_main_works(dist: DistInfo, work: Callable[[], T], then: Callable[[], T], *, done: Path, failed: Path, what: str,
                     timeout_s: float, timeout_error: type[errors.TrainerError] = errors.TrainerError,
                     poll_s: float = 0.5) -> T:
    """Local rank 0 runs ``work``; the pod's other local ranks wait for it, then run ``then`` (read its result).

    ``done`` is written once ``work`` returns. When ``work`` raises, local rank 0 writes ``failed`` with the
    reason and message, and every waiting rank raises the same :class:`~.errors.TrainerError` at once, so
    the pod exits with one reason and one exit code instead of the waiters hanging until ``timeout_s``
    (after which they raise ``timeout_error``). ``failed`` must belong to this launch (see :func:`launch_key`).
    A SIGTERM while waiting raises in the sleep, as anywhere before the training loop.
    """
    if dist.is_local_main:
        try:
            result = work()
        except errors.TrainerError as e:
            _write_atomic(failed, json.dumps({"reason": e.reason, "message": e.message}))
            raise
        except Exception as e:  # noqa: BLE001 - the waiters must not wait forever; the error itself propagates here
            _write_atomic(failed, json.dumps({"reason": errors.TrainerError.reason,
                                              "message": f"local rank 0 could not {what}: {type(e).__name__}: {e}"}))
            raise
        _write_atomic(done, "")
        return result
    deadline = time.monotonic() + timeout_s
    while not done.exists():
        if failed.exists():
            raise _failure(failed)
        if time.monotonic() > deadline:
            raise timeout_error(f"timed out waiting for local rank 0 to {what}")
        time.sleep(poll_s)
    return then()


def _failure(path: Path) -> errors.TrainerError:
    failure = json.loads(path.read_text())
    cls = errors.ERRORS.get(failure.get("reason"), errors.TrainerError)
    return cls(failure.get("message", "failed on local rank 0"))


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
