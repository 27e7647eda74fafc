"""Continue from a checkpoint: pick one every rank can load, restore it, and map the data position.

``checkpoint.resume`` says where from: ``latest`` (the newest complete checkpoint under the output,
skipping ones that fail verification), ``none``, or one checkpoint's URI (which must load). Weights,
optimizer, scheduler, scaler and RNG come back through :class:`~.checkpoint.CheckpointManager`; the
rest is the :class:`~.state.TrainerState` in the checkpoint. A group that comes back with another
number of processes continues at the same row of the epoch (:func:`remap_position`), with the LR
schedule rebuilt for the remapped total steps (:func:`~.optim.reschedule`).
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

from . import distributed
from .errors import CheckpointError
from .optim import reschedule
from .state import TrainerState

if TYPE_CHECKING:
    from .train import Trainer

log = logging.getLogger(__name__)


def maybe_resume(trainer: Trainer) -> str | None:
    """Restore the checkpoint ``checkpoint.resume`` names into ``trainer`` (its state included); its URI, or None."""
    resume = trainer.spec.checkpoint.resume
    checkpoints = trainer.checkpoints
    if trainer.dist.is_main and resume == "latest":
        checkpoints.cleanup_incomplete()
    distributed.barrier()
    if resume == "none":
        return None
    candidates = [c.uri for c in reversed(checkpoints.complete())] if resume == "latest" else [checkpoints.find_resume(resume)]
    chosen, state = _load_first(trainer, candidates, strict=resume != "latest")
    # Every rank must continue from the same step, or DDP would deadlock or silently diverge.
    if len(set(distributed.gather_objects(chosen))) > 1:
        raise CheckpointError("ranks could not agree on a checkpoint to resume from (a download failed on some ranks); retrying")
    if chosen is None or state is None:
        return None
    total_steps = trainer.state.total_steps
    trainer.state = st = TrainerState.from_dict(state)
    saved_world = st.world_size or trainer.dist.world_size
    if saved_world != trainer.dist.world_size:
        total_steps = remap_position(trainer, saved_world)
        # The scheduler was built for a fresh run's total at this size; warm-up and decay must follow the remapped one.
        trainer.scheduler = reschedule(trainer.scheduler, trainer.hp, total_steps)
    elif st.total_steps != total_steps:
        log.warning("planned steps changed from %d to %d (data changed?)", st.total_steps, total_steps)
    st.total_steps = total_steps
    st.world_size = trainer.dist.world_size
    if trainer.early_stopping is not None and st.early_stopping:
        trainer.early_stopping.load_state_dict(st.early_stopping)
    log.info("resumed from %s at step %d (epoch %d, batch %d)", chosen, st.step, st.epoch, st.batch)
    for c in checkpoints.complete():
        trainer.progress.add_checkpoint(c.step, c.uri, st.checkpoint_metrics.get(str(c.step)))
    best = st.best_metric if st.best_metric is not None and math.isfinite(st.best_metric) else None
    trainer.progress.update(force=True, step=st.step, total_steps=st.total_steps, best_metric=best)
    return chosen


def _load_first(trainer: Trainer, candidates: list[str], *, strict: bool) -> tuple[str | None, dict[str, Any] | None]:
    """The first candidate that loads, and its trainer state; a failure is fatal only when one was named."""
    for uri in candidates:
        try:
            state = trainer.checkpoints.load(uri, model_state=trainer.model_state, scheduler=trainer.scheduler, scaler=trainer.scaler)
        except CheckpointError as e:
            if strict:
                raise
            log.warning("skipping checkpoint %s: %s", uri, e.message)
            continue
        return uri, state
    return None, None


def remap_position(trainer: Trainer, saved_world: int) -> int:
    """Continue a run checkpointed by ``saved_world`` processes on this many; returns the new total steps.

    The epoch's row order does not depend on the world size (see :mod:`.collate`), only how it is cut
    into global micro-batches does. So the rows consumed so far are a prefix of that order, and the new
    position is the first new-size micro-batch that starts at or before the end of that prefix: at most
    ``batchSize x worldSize - 1`` rows are seen once more, none is skipped. The optimizer and weights
    carry over as they are; the loss curve is not bit-identical to an uninterrupted run (the global batch
    changed), and every rank the old group did not have starts a fresh dropout stream.
    """
    st, b, hp = trainer.state, trainer.batching, trainer.hp
    rows_done = st.batch * hp.batch_size * saved_world
    new_batch = rows_done // b.global_batch
    old = (st.epoch, st.batch)
    st.epoch, st.batch = (st.epoch + 1, 0) if new_batch >= b.batches_per_epoch else (st.epoch, new_batch)
    if hp.max_steps:
        total = hp.max_steps
    else:
        done_epochs = st.epoch + st.batch / b.batches_per_epoch
        total = st.step + max(0, math.ceil((hp.total_epochs - done_epochs) * trainer.steps_per_epoch))
    log.warning("world size changed from %d to %d: data position (epoch %d, micro-batch %d) -> (epoch %d, micro-batch %d), "
                "%d rows repeated; total steps %d -> %d", saved_world, trainer.dist.world_size, *old, st.epoch, st.batch,
                rows_done - st.batch * b.global_batch if st.batch else 0, st.total_steps, total)
    return total
