"""Stage 4: the training run, top to bottom.

    config -> data -> model -> baseline -> [train step, eval, checkpoint]* -> best model -> test -> export

:func:`run` reads like that list. The loop is ours (not ``transformers.Trainer``) because the guarantees
the operator relies on live in it: exact resume (the data order is a pure function of seed and epoch,
see :mod:`.collate`; weights, optimizer, scheduler and every rank's RNG come back from the checkpoint),
a clean checkpoint-and-exit on SIGTERM, and only rank 0 touching shared storage. accelerate provides
the process group (DDP from the torchrun environment), mixed precision and gradient sync.

Gradient accumulation: a window of ``gradientAccumulationSteps`` micro-batches is one optimizer step.
The loss of each micro-batch is summed and divided by the window's total count of loss tokens (LM) or
rows (classification; sum of class weights when weighted), so every token weighs the same however the
rows fall into micro-batches, and the logged step loss is the window's mean token loss.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from finetune_api import env as pod_env
from finetune_api import metric_catalogue
from finetune_api.documents import DATA_REPORT_FILE
from finetune_api.metric_catalogue import Direction

from . import distributed
from .checkpoint import CheckpointManager
from .collate import IGNORE_INDEX, Batching, ClassificationCollator, PaddedLMCollator, label_tokens, make_collator, token_counts
from .config import JobConfig
from .distributed import DistInfo, dist_info
from .errors import EXIT_PREEMPTED, CheckpointError, InvalidConfig, TrainerError
from .evaluate import improves
from .metrics import TrainerMetrics
from .model import check_hardware, load_model, load_tokenizer, resolve_model_dir
from .progress import ProgressWriter

log = logging.getLogger(__name__)

DEFAULT_WORK_DIR = "/tmp/finetune-work"  # outside a pod (the operator sets FINETUNE_WORK_DIR to an emptyDir)
GENERATION_EVAL_SAMPLES = 32  # validation prompts completed at each evaluation when bleu/rouge are asked for


class Preempted(BaseException):
    """SIGTERM was handled: a checkpoint is written, exit with errors.EXIT_PREEMPTED.

    A BaseException, like KeyboardInterrupt: it can be raised by the signal handler anywhere (inside a
    library call during data preparation or model loading), and no ``except Exception`` on the way up
    may turn it into a failure such as ModelNotFound.
    """

    exit_code = EXIT_PREEMPTED


# ------------------------------------------------------------------------------------- preemption


class SigtermFlag:
    """SIGTERM during training sets a flag the loop checks after each step; before/after it, we exit now."""

    def __init__(self) -> None:
        self.requested = False
        self.in_loop = False

    def install(self) -> None:
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, getattr(self, "_previous", None) or signal.SIG_DFL)

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        if not self.in_loop:
            raise Preempted("SIGTERM before training started")
        log.warning("SIGTERM: finishing the current step, then checkpointing and exiting")


# --------------------------------------------------------------------------------- trainer state


@dataclass
class TrainerState:
    """Everything besides tensors that a resumed run needs to continue exactly (trainer_state.json)."""

    step: int = 0
    epoch: int = 0  # epoch the next micro-batch comes from
    batch: int = 0  # index of the next micro-batch within that epoch
    total_steps: int = 0
    stopped_early: bool = False
    early_stopping: dict[str, Any] | None = None
    best_metric: float | None = None
    best_step: int | None = None
    history: list[dict[str, Any]] = field(default_factory=list)  # one entry per optimizer step
    evals: list[dict[str, Any]] = field(default_factory=list)  # one entry per evaluation
    baseline: dict[str, Any] | None = None
    retention_before: float | None = None
    checkpoint_metrics: dict[str, float | None] = field(default_factory=dict)  # step -> monitored metric
    world_size: int | None = None  # processes that wrote this state (a resume on another count remaps the position)

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainerState":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


# ------------------------------------------------------------------------------------------ helpers

HISTORY_LIMIT = 2000  # entries of per-step (and per-eval) history kept in trainer_state.json and the model card


def thin_history(entries: list[dict[str, Any]], limit: int) -> None:
    """Keep ``entries`` under ``limit`` in place: the newest ``limit // 2`` stay, older ones are halved.

    Repeated halving of the older part keeps the whole curve's shape at a resolution that falls with age,
    so trainer_state.json (rewritten at every checkpoint) stays small on runs of any length. It is a pure
    function of the entries, so a resumed run thins exactly like an uninterrupted one.
    """
    if len(entries) <= limit:
        return
    keep = limit // 2
    older, recent = entries[:-keep], entries[-keep:]
    entries[:] = older[::2] + recent


def _storage_for(spec: Any) -> tuple[Any, Any]:
    from .storage import Storage, join

    return Storage.from_spec(spec.storage), join


def _prepare_data(spec: Any, storage: Any, tokenizer: Any, work_dir: Path, dist: DistInfo) -> Any:
    from .data.shared import prepare_data_per_node

    return prepare_data_per_node(spec, storage, tokenizer, root=work_dir, local_rank=dist.local_rank, local_world_size=dist.local_world_size)


def _rows(dataset: Any, indices: list[int]) -> list[dict[str, Any]]:
    cols = dataset[indices]
    keys = list(cols)
    return [{k: cols[k][i] for k in keys} for i in range(len(indices))]


class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, dataset: Any, columns: list[str]):
        self.dataset = dataset
        self.columns = [c for c in columns if c in dataset.column_names]

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = self.dataset[int(i)]
        return {c: row[c] for c in self.columns}


def eval_loader(dataset: Any, *, classification: bool, batch_size: int, pad_token_id: int, max_samples: int | None = None) -> Any:
    """Padded, unshuffled batches of ``dataset`` (None when there is nothing to evaluate)."""
    if dataset is None or len(dataset) == 0:
        return None
    if max_samples is not None and len(dataset) > max_samples:
        dataset = dataset.select(range(max_samples))
    collate = ClassificationCollator(pad_token_id) if classification else PaddedLMCollator(pad_token_id)
    cols = ["input_ids", "label"] if classification else ["input_ids", "labels"]
    return torch.utils.data.DataLoader(_ListDataset(dataset, cols), batch_size=batch_size, shuffle=False, collate_fn=collate)


def _finite(x: Any) -> float | None:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _public(result: dict[str, Any] | None) -> dict[str, Any] | None:
    """An eval result without tensors (logits/labels), fit for JSON."""
    if result is None:
        return None
    return {k: v for k, v in result.items() if not isinstance(v, torch.Tensor)}


# ---------------------------------------------------------------------------------------- trainer


class Trainer:
    def __init__(self, config: JobConfig, *, work_dir: str | Path | None = None):
        self.config = config
        self.spec = config.spec
        self.hp = config.spec.hyperparameters
        self.dist: DistInfo = dist_info()
        self.classification = self.spec.is_classification
        self.storage, self.join = _storage_for(self.spec)
        self.output = config.output_uri
        self.work_dir = Path(work_dir or os.environ.get(pod_env.WORK_DIR, DEFAULT_WORK_DIR)) / config.name
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.metrics = TrainerMetrics(config.name, self.dist.rank)
        self.progress = ProgressWriter(self.storage, self.output, enabled=self.dist.is_main, join=self.join)
        self.sigterm = SigtermFlag()
        self.state = TrainerState()
        es = self.spec.evaluation.early_stopping
        self.monitor = es.metric if es else "eval_loss"
        self.monitor_mode: Direction = es.direction if es else "min"  # which way is better: early stopping, best model
        self.generation = [m for m in (self.spec.evaluation.metrics or []) if m in metric_catalogue.GENERATION_METRICS]
        known = metric_catalogue.monitorable(self.spec.model.task, self.spec.evaluation.metrics)
        if self.monitor not in known:
            raise InvalidConfig(f"evaluation.earlyStopping.metric {self.monitor!r} is not computed for this task; use one of {', '.join(known)}")

    # ------------------------------------------------------------------------------------ stages

    def _stage(self, stage: str, **fields: Any) -> None:
        log.info("stage: %s", stage)
        self.metrics.set_stage(stage)
        self.progress.stage(stage, **fields)

    def run(self) -> dict[str, Any]:
        self.sigterm.install()
        try:
            return self._run()
        except Preempted:
            if self.progress.doc.stage != "preempted":  # stopped before the loop (the loop reports its own)
                self.progress.update(force=True, stage="preempted")
            raise
        except Exception as e:
            # Tell the operator which stage failed; __main__ still writes the termination message.
            line = e.line() if isinstance(e, TrainerError) else f"{type(e).__name__}: {str(e).strip()[:300]}"
            self.progress.update(force=True, stage="failed", failureReason=line)
            raise
        finally:
            self.sigterm.restore()
            self.metrics.close()

    def _run(self) -> dict[str, Any]:
        from transformers import set_seed

        from .model import count_parameters
        from .parallel import FSDP, choose_strategy, make_accelerator

        check_hardware(self.spec)
        set_seed(self.hp.seed)

        self._stage("preparing-data")
        model_dir = self.model_dir = resolve_model_dir(self.spec.model.uri, self.storage, self.dist, cache_dir=os.environ.get(pod_env.CACHE_DIR))
        self.tokenizer = load_tokenizer(model_dir, self.spec)
        # Local rank 0 prepares the (deterministic) data for its node; the other local ranks map the same files.
        self.data = _prepare_data(self.spec, self.storage, self.tokenizer, self.work_dir, self.dist)
        self._publish_data_report()

        self._stage("loading-model")
        # The strategy depends on the model's size (counted from its config), and under FSDP only rank 0
        # reads the weights. The process group is joined only after loading (creating the Accelerator
        # does that under torchrun); nothing before this point is a collective.
        self.strategy = choose_strategy(self.hp.distributed_strategy, method=self.spec.method, world_size=self.dist.world_size,
                                        total_params=count_parameters(model_dir, self.spec) if self.dist.distributed else 0)
        if self.dist.distributed:
            log.info("distributed strategy: %s over %d processes", self.strategy, self.dist.world_size)
        set_seed(self.hp.seed)  # the new head / adapter init does not depend on what data prep consumed
        loaded = load_model(model_dir, self.spec, labels=self.data.labels, tokenizer=self.tokenizer, dist=self.dist,
                            empty=self.strategy == FSDP and not self.dist.is_main)
        self.loaded = loaded
        self.num_labels = len(self.data.labels) if self.data.labels else self.spec.model.num_labels
        self.accelerator = make_accelerator(loaded.precision)
        self._build_optimization(loaded.model)

        self.checkpoints = CheckpointManager(
            self.storage, self.output, self.work_dir / "checkpoints", self.dist,
            keep_last=self.spec.checkpoint.keep_last, is_adapter=loaded.is_adapter, join=self.join,
        )
        self.checkpoints.on_complete = self._on_checkpoint_complete
        resumed_from = self._maybe_resume()
        if resumed_from is None:
            # Different dropout streams per rank; a resumed run gets each rank's own stream back instead.
            torch.manual_seed(self.hp.seed + 1000 * self.dist.rank)

        if resumed_from is None and (self.spec.evaluation.baseline or self._retention_loader() is not None):
            self._baseline()

        self._stage("training", total_steps=self.state.total_steps, best_metric_name=self.monitor)
        self._train()
        self.checkpoints.wait()

        return self._finish()

    # --------------------------------------------------------------------------------- data report

    def _publish_data_report(self) -> None:
        report_uri = self.join(self.output, DATA_REPORT_FILE)
        summary = self.data.summary(report_uri)
        summary_dict = summary.model_dump() if hasattr(summary, "model_dump") else dict(summary)
        summary_dict["report_uri"] = report_uri
        self.metrics.on_data(summary_dict)
        if self.dist.is_main:
            self.storage.write_json(report_uri, self.data.report)
            self.progress.set_data(summary_dict)
        try:
            from .data import format_report

            for line in format_report(self.data.report).splitlines():
                log.info("data: %s", line)
        except Exception:  # noqa: BLE001 - the report is informative only
            pass

    # -------------------------------------------------------------------------------- optimization

    def _build_optimization(self, model: Any) -> None:
        from transformers import get_scheduler

        from .parallel import FSDP, ModelState, shard

        hp = self.hp
        if self.strategy == FSDP:
            model = shard(model, self.loaded.precision, is_main=self.dist.is_main)  # before the optimizer: sharding replaces the parameters
        self.batching = Batching(len(self.data.train), hp.batch_size, self.dist.world_size, self.dist.rank, hp.seed)
        self.accum = hp.gradient_accumulation_steps
        self.steps_per_epoch = math.ceil(self.batching.batches_per_epoch / self.accum)
        self.state.total_steps = hp.max_steps or max(1, math.ceil(hp.total_epochs * self.steps_per_epoch))
        self.state.world_size = self.dist.world_size
        decay, no_decay = [], []
        for name, p in model.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
        groups = [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=hp.learning_rate)
        self.scheduler = get_scheduler(
            hp.lr_scheduler, optimizer,
            num_warmup_steps=int(round(hp.warmup_ratio * self.state.total_steps)),
            num_training_steps=self.state.total_steps,
        )
        # The scheduler is stepped by us, once per optimizer step: accelerate's wrapper would step it
        # world_size times per step.
        if self.strategy == FSDP:
            self.model, self.optimizer = model, self.accelerator.prepare(optimizer)
        else:
            self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.raw_model = self.accelerator.unwrap_model(self.model)
        self.model_state = ModelState(self.strategy, self.model, self.raw_model, self.optimizer, is_main=self.dist.is_main)
        self.collate = make_collator(classification=self.classification, packing=hp.packing, pad_token_id=self.tokenizer.pad_token_id)
        self.class_weights = None
        if self.classification and self.data.class_weights and self.spec.dataset.preprocessing.class_weights:
            self.class_weights = torch.tensor(self.data.class_weights, dtype=torch.float32, device=self.accelerator.device)
        from .evaluate import EarlyStopping

        es = self.spec.evaluation.early_stopping
        self.early_stopping = EarlyStopping.from_spec(es) if es else None
        self.val_loader = self._eval_loader(self.data.validation, max_samples=self.spec.evaluation.max_eval_samples)
        self.metrics.set_total_steps(self.state.total_steps)

    @property
    def _scaler(self) -> Any:
        return getattr(self.accelerator, "scaler", None)

    # ------------------------------------------------------------------------------------- resume

    def _maybe_resume(self) -> str | None:
        resume = self.spec.checkpoint.resume
        if self.dist.is_main and resume == "latest":
            self.checkpoints.cleanup_incomplete()
        distributed.barrier()
        if resume == "none":
            return None
        if resume == "latest":
            candidates = [c.uri for c in reversed(self.checkpoints.complete())]
        else:
            candidates = [self.checkpoints.find_resume(resume)]
        total_steps = self.state.total_steps
        chosen = None
        for uri in candidates:
            try:
                state = self.checkpoints.load(uri, model_state=self.model_state, scheduler=self.scheduler, scaler=self._scaler)
            except CheckpointError as e:
                if resume != "latest":
                    raise
                log.warning("skipping checkpoint %s: %s", uri, e.message)
                continue
            chosen = uri
            break
        # Every rank must continue from the same step, or DDP would deadlock or silently diverge.
        if len(set(distributed.gather_objects(chosen))) > 1:
            raise CheckpointError("ranks could not agree on a checkpoint to resume from (a download failed on some ranks); retrying")
        if chosen is None:
            return None
        self.state = TrainerState.from_dict(state)
        saved_world = self.state.world_size or self.dist.world_size
        if saved_world != self.dist.world_size:
            total_steps = self._remap_position(saved_world)
        elif self.state.total_steps != total_steps:
            log.warning("planned steps changed from %d to %d (data changed?)", self.state.total_steps, total_steps)
        self.state.total_steps = total_steps
        self.state.world_size = self.dist.world_size
        if self.early_stopping is not None and self.state.early_stopping:
            self.early_stopping.load_state_dict(self.state.early_stopping)
        log.info("resumed from %s at step %d (epoch %d, batch %d)", chosen, self.state.step, self.state.epoch, self.state.batch)
        for c in self.checkpoints.complete():
            self.progress.add_checkpoint(c.step, c.uri, self.state.checkpoint_metrics.get(str(c.step)))
        self.progress.update(force=True, step=self.state.step, total_steps=self.state.total_steps, best_metric=_finite(self.state.best_metric))
        return chosen

    def _remap_position(self, saved_world: int) -> int:
        """Continue a run checkpointed by ``saved_world`` processes on this many; returns the new total steps.

        The epoch's row order does not depend on the world size (see :mod:`.collate`), only how it is cut
        into global micro-batches does. So the rows consumed so far are a prefix of that order, and the new
        position is the first new-size micro-batch that starts at or before the end of that prefix: at most
        ``batchSize x worldSize - 1`` rows are seen once more, none is skipped. The optimizer and weights
        carry over as they are; the loss curve is not bit-identical to an uninterrupted run (the global batch
        changed), and every rank the old group did not have starts a fresh dropout stream.
        """
        st, b = self.state, self.batching
        rows_done = st.batch * self.hp.batch_size * saved_world
        new_batch = rows_done // b.global_batch
        old = (st.epoch, st.batch)
        st.epoch, st.batch = (st.epoch + 1, 0) if new_batch >= b.batches_per_epoch else (st.epoch, new_batch)
        if self.hp.max_steps:
            total = self.hp.max_steps
        else:
            done_epochs = st.epoch + st.batch / b.batches_per_epoch
            total = st.step + max(0, math.ceil((self.hp.total_epochs - done_epochs) * self.steps_per_epoch))
        log.warning("world size changed from %d to %d: data position (epoch %d, micro-batch %d) -> (epoch %d, micro-batch %d), "
                    "%d rows repeated; total steps %d -> %d", saved_world, self.dist.world_size, *old, st.epoch, st.batch,
                    rows_done - st.batch * b.global_batch if st.batch else 0, st.total_steps, total)
        return total

    # ----------------------------------------------------------------------------------- evaluate

    def _eval_loader(self, dataset: Any, max_samples: int | None = None) -> Any:
        """Padded eval batches; under DDP each rank takes a shard and the metrics are gathered (exactly, see evaluate)."""
        loader = eval_loader(dataset, classification=self.classification, batch_size=self.hp.batch_size,
                             pad_token_id=self.tokenizer.pad_token_id, max_samples=max_samples)
        if loader is not None and self.dist.distributed:
            loader = self.accelerator.prepare(loader)  # no sampler generator: does not touch any RNG
        return loader

    def evaluate(self, loader: Any = None, **kwargs: Any) -> dict[str, Any]:
        """Collective under DDP: every rank calls it and gets the same, global result."""
        from .evaluate import evaluate_classification, evaluate_lm

        loader = loader if loader is not None else self.val_loader
        accelerator = self.accelerator if self.dist.distributed else None
        with self.accelerator.autocast():
            if self.classification:
                return evaluate_classification(self.raw_model, loader, num_labels=self.num_labels, label_names=self.data.labels,
                                               accelerator=accelerator, **kwargs)
            return evaluate_lm(self.raw_model, loader, accelerator=accelerator)

    def _retention_loader(self) -> Any:
        if self.spec.evaluation.retention is None or getattr(self.data, "retention", None) is None:
            return None
        return self._eval_loader(self.data.retention, max_samples=self.spec.evaluation.max_eval_samples)

    def _baseline(self) -> None:
        self._stage("baseline")
        baseline: dict[str, Any] = {}
        if self.spec.evaluation.baseline and self.val_loader is not None:
            baseline = _public(self.evaluate()) or {}
            if self.classification:
                from .evaluate import majority_baseline

                train_labels = [int(x) for x in self.data.train["label"]]
                eval_labels = [int(x) for x in self.data.validation["label"]]
                baseline["majority"] = majority_baseline(train_labels, eval_labels, self.num_labels)
            log.info("baseline: %s", {k: v for k, v in baseline.items() if isinstance(v, float)})
        retention = self._retention_loader()
        if retention is not None:
            self.state.retention_before = float(self.evaluate(retention)["eval_loss"])
        self.state.baseline = baseline or None

    # -------------------------------------------------------------------------------------- train

    def _loss(self, batch: dict[str, torch.Tensor], denominator: float) -> torch.Tensor:
        labels = batch["labels"]
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        if not self.classification:
            # No KV cache: with one, transformers skips the packed-row detection that keeps attention per row.
            inputs["use_cache"] = False
        logits = self.model(**inputs).logits.float()
        if self.classification:
            return F.cross_entropy(logits, labels, weight=self.class_weights, reduction="sum") / denominator
        shifted = labels[..., 1:].reshape(-1)
        return F.cross_entropy(logits[..., :-1, :].reshape(-1, logits.shape[-1]), shifted, ignore_index=IGNORE_INDEX, reduction="sum") / denominator

    def _denominator(self, batches: list[dict[str, torch.Tensor]]) -> float:
        if not self.classification:
            return float(max(1, sum(label_tokens(b) for b in batches)))
        if self.class_weights is not None:
            return float(sum(self.class_weights[b["labels"]].sum().item() for b in batches)) or 1.0
        return float(sum(int(b["labels"].numel()) for b in batches))

    def _windows(self) -> Any:
        """(epoch, first micro-batch index, [row index lists]) for every remaining optimizer step, forever."""
        epoch, batch = self.state.epoch, self.state.batch
        while True:
            remaining = self.batching.epoch_batches(epoch, start_batch=batch)
            for i in range(0, len(remaining), self.accum):
                yield epoch, batch + i, remaining[i : i + self.accum]
            epoch, batch = epoch + 1, 0

    def _optimizer_step(self, window: list[list[int]]) -> dict[str, Any]:
        """Forward/backward over one accumulation window, clip, step. Returns what the step measured."""
        t0 = time.monotonic()
        device = self.accelerator.device
        self.model.train()
        batches = [{k: v.to(device) for k, v in self.collate(_rows(self.data.train, rows)).items()} for rows in window]
        denominator = self._denominator(batches)
        window_loss = torch.zeros((), device=device)
        real = total = 0
        for i, batch in enumerate(batches):
            # Gradients are all-reduced once per window, on its last micro-batch.
            sync = contextlib.nullcontext() if i == len(batches) - 1 else self.model_state.no_sync(self.accelerator)
            with sync, self.accelerator.autocast():
                loss = self._loss(batch, denominator)
                self.accelerator.backward(loss)
            window_loss += loss.detach()
            r, t = token_counts(batch)
            real, total = real + r, total + t
        grad_norm = self.model_state.clip_grad_norm(self.accelerator, self.hp.max_grad_norm)
        self.optimizer.step()
        if not self.accelerator.optimizer_step_was_skipped:  # fp16 overflow: the scaler skipped this step
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {
            "loss": float(self.accelerator.reduce(window_loss, reduction="mean").item()),
            "grad_norm": _finite(grad_norm.item() if isinstance(grad_norm, torch.Tensor) else grad_norm),
            "tokens": real,
            "padding": (1 - real / total) if total else None,
            "samples": sum(len(rows) for rows in window),
            "seconds": time.monotonic() - t0,
        }

    def _train(self) -> None:
        st, ev = self.state, self.spec.evaluation
        if st.step >= st.total_steps or st.stopped_early:
            log.info("training already finished at step %d", st.step)
            return
        per_epoch = self.batching.batches_per_epoch
        self.progress.start_clock(st.step)
        self.sigterm.in_loop = True
        try:
            for epoch, first, window in self._windows():
                measured = self._optimizer_step(window)

                # Bookkeeping: the data position is the next micro-batch to read (what resume skips to).
                st.step += 1
                st.epoch, st.batch = (epoch + 1, 0) if first + len(window) >= per_epoch else (epoch, first + len(window))
                epoch_done = st.batch == 0
                lr = float(self.scheduler.get_last_lr()[0])
                fractional_epoch = st.epoch + st.batch / per_epoch
                st.history.append({"step": st.step, "loss": measured["loss"], "lr": lr, "grad_norm": measured["grad_norm"],
                                   "epoch": round(fractional_epoch, 4)})
                thin_history(st.history, HISTORY_LIMIT)
                self.metrics.on_step(step=st.step, epoch=fractional_epoch, lr=lr, **measured)
                self.progress.update(step=st.step, epoch=fractional_epoch, train_loss=_finite(measured["loss"]), learning_rate=lr)
                log.info("step %d/%d epoch %.2f loss %.4f lr %.3g", st.step, st.total_steps, fractional_epoch, measured["loss"], lr)

                # Evaluate, then decide whether to checkpoint and whether to stop.
                last = st.step >= st.total_steps
                due = (ev.strategy == "steps" and st.step % ev.every_steps == 0) or (ev.strategy == "epoch" and epoch_done)
                new_best = self._eval_step() if self.val_loader is not None and (due or last) else False
                stop_early = self.early_stopping is not None and self.early_stopping.should_stop
                preempt = distributed.any_rank(self.sigterm.requested)
                keep_best = new_best and self._use_best
                if st.step % self.spec.checkpoint.every_steps == 0 or last or stop_early or preempt or keep_best:
                    st.stopped_early = stop_early
                    self._save()
                if preempt:
                    self.checkpoints.wait()
                    self._stage("preempted", step=st.step)
                    raise Preempted(f"SIGTERM: checkpointed at step {st.step}")
                if stop_early:
                    es = self.early_stopping
                    log.info("early stopping at step %d: %s has not improved for %d evaluations (best %.4g at step %s)",
                             st.step, self.monitor, es.patience, es.best, es.best_step)
                    return
                if last:
                    return
        finally:
            self.sigterm.in_loop = False

    def _eval_step(self) -> bool:
        st = self.state
        result = _public(self.evaluate()) or {}
        if self.generation:
            # Scored on rank 0 (every rank under FSDP); the decision to stop must be the same everywhere.
            scores = distributed.broadcast_object(self._generation_metrics(self.data.validation, GENERATION_EVAL_SAMPLES))
            result.update(scores or {})
        value = result.get(self.monitor)
        entry = {"step": st.step, **{k: v for k, v in result.items() if isinstance(v, (int, float))}}
        st.evals.append(entry)
        thin_history(st.evals, HISTORY_LIMIT)
        new_best = False
        if self.early_stopping is not None:
            new_best = self.early_stopping.update_from(result, st.step)
            st.early_stopping = self.early_stopping.state_dict()
            st.best_metric, st.best_step = self.early_stopping.best, self.early_stopping.best_step
        elif value is not None and improves(float(value), st.best_metric, self.monitor_mode):
            st.best_metric, st.best_step, new_best = float(value), st.step, True
        self.metrics.on_eval(result, best_name=self.monitor, best=st.best_metric)
        self.progress.update(force=True, eval_loss=_finite(result.get("eval_loss")), best_metric=_finite(st.best_metric), best_metric_name=self.monitor)
        log.info("eval at step %d: %s", st.step, {k: round(v, 4) for k, v in entry.items() if isinstance(v, float)})
        return new_best

    def _save(self) -> None:
        st = self.state
        last_eval = st.evals[-1] if st.evals else {}
        st.checkpoint_metrics[str(st.step)] = _finite(last_eval.get(self.monitor)) if last_eval.get("step") == st.step else None
        best_step = st.best_step if self._use_best else None
        self.checkpoints.save(st.step, model_state=self.model_state, scheduler=self.scheduler,
                              scaler=self._scaler, state=st.to_dict(), best_step=best_step)

    def _on_checkpoint_complete(self, step: int, uri: str, seconds: float, nbytes: int) -> None:
        self.metrics.on_checkpoint(step, seconds, nbytes)
        kept = {c.step for c in self.checkpoints.complete()}
        self.progress.add_checkpoint(step, uri, self.state.checkpoint_metrics.get(str(step)), kept_steps=kept)

    # ------------------------------------------------------------------------------------- finish

    @property
    def _use_best(self) -> bool:
        """Keep the best checkpoint and finish with its weights (evaluation.useBestModel, with validation data)."""
        return self.spec.evaluation.use_best_model and self.val_loader is not None

    def _finish(self) -> dict[str, Any]:
        st = self.state
        best_uri = None
        if self._use_best and st.best_step is not None:
            best_uri = self.checkpoints.uri_for(st.best_step)
            if st.best_step != st.step:
                log.info("restoring the best checkpoint (step %d, %s %.4g)", st.best_step, self.monitor, st.best_metric)
                self.checkpoints.load_weights(best_uri, self.model_state)

        self._stage("testing")
        final_eval = _public(self.evaluate(return_logits=False)) if self.val_loader is not None else None
        calibration = None
        temperature = 1.0
        if self.classification and self.spec.evaluation.calibration and self.val_loader is not None:
            from .evaluate import calibrate

            val = self.evaluate(return_logits=True)
            calibration = calibrate(val["logits"], val["labels"])
            temperature = calibration["temperature"]
        test_loader = self._eval_loader(self.data.test)
        test_eval = None
        if test_loader is not None:
            kwargs = {"temperature": temperature} if self.classification else {}
            test_eval = _public(self.evaluate(test_loader, **kwargs))
        generation = self._generation_metrics(self.data.test, self.spec.evaluation.max_eval_samples or 64) if self.generation else None
        if generation and test_eval is not None:
            test_eval.update(generation)
        retention = None
        retention_loader = self._retention_loader()
        if retention_loader is not None and st.retention_before is not None:
            from .evaluate import retention_check

            after = float(self.evaluate(retention_loader)["eval_loss"])
            retention = retention_check(st.retention_before, after, self.spec.evaluation.retention)
            if not retention["passed"]:
                log.warning("retention check failed: loss %.4f -> %.4f", retention["loss_before"], retention["loss_after"])

        gain = None
        gain_metric = "accuracy" if self.classification and self.monitor == "eval_loss" else self.monitor
        gain_mode = metric_catalogue.direction(gain_metric) or self.monitor_mode
        if st.baseline and final_eval and gain_metric in st.baseline and gain_metric in final_eval:
            from .evaluate import gain as compute_gain

            gain = compute_gain(st.baseline, final_eval, gain_metric, gain_mode)
            self.progress.set_gain(gain_metric, _finite(gain["baseline"]), _finite(gain["final"]))

        summary = {
            "job": self.config.name,
            "steps": st.step,
            "total_steps": st.total_steps,
            "stopped_early": st.stopped_early,
            "best_step": st.best_step,
            "best_metric": st.best_metric,
            "monitor": self.monitor,
            "baseline": st.baseline,
            "final_eval": final_eval,
            "test_eval": test_eval,
            "calibration": calibration,
            "retention": retention,
            "gain": gain,
            "history": st.history,
            "evals": st.evals,
        }
        # Replicas must end identical; the checksum in every rank's log makes a divergence visible.
        log.info("final trainable parameter checksum %.12e", self.model_state.checksum())
        model_uri = self.join(self.output, "model")
        self.progress.update(force=True, evaluation={
            "baseline": st.baseline, "final": final_eval, "test": test_eval, "calibration": calibration, "retention": retention,
        })
        full_weights = self.model_state.gather_full_model()  # a collective under FSDP, None otherwise
        if self.dist.is_main:
            self._stage("saving")
            self._export(model_uri, summary, best_uri, full_weights)
        del full_weights
        distributed.barrier()
        self._stage("done", model_uri=model_uri)
        summary["model_uri"] = model_uri
        return summary

    def _generation_metrics(self, dataset: Any, limit: int) -> dict[str, float] | None:
        """BLEU / ROUGE-L of greedy completions on up to ``limit`` rows of ``dataset`` (evaluation.metrics).

        Rank 0 only (every rank under FSDP, where each forward is a collective).

        Prompts and references are recovered from the tokenised rows: the prompt is everything before
        the first scored token, the reference the first scored span (a completion or assistant turn).
        """
        wanted = self.generation
        if self.classification or not wanted or dataset is None or not (self.dist.is_main or self.model_state.sharded):
            return None
        from .evaluate import generate_and_score

        prompts, references = [], []
        for row in dataset.select(range(min(limit, len(dataset)))):
            ids, labels = list(row["input_ids"]), list(row["labels"])
            first = next((i for i, t in enumerate(labels) if t != IGNORE_INDEX), None)
            if not first:  # no prompt (plain text rows) or nothing scored
                continue
            end = next((i for i in range(first, len(labels)) if labels[i] == IGNORE_INDEX), len(labels))
            prompts.append(self.tokenizer.decode(ids[:first], skip_special_tokens=True))
            references.append(self.tokenizer.decode(ids[first:end], skip_special_tokens=True).strip())
        if not prompts:
            log.warning("evaluation.metrics %s need prompt/completion or chat rows; skipped", wanted)
            return None
        with self.accelerator.autocast():
            scores = generate_and_score(self.raw_model, self.tokenizer, prompts, references, metrics=wanted,
                                        max_new_tokens=min(128, self.hp.max_seq_length), batch_size=self.hp.batch_size)
        log.info("generation metrics on %d %s prompts: %s", len(prompts), "test" if dataset is self.data.test else "validation", scores)
        return scores

    def _export(self, model_uri: str, summary: dict[str, Any], best_uri: str | None, full_weights: dict[str, Any] | None = None) -> None:
        local = self.work_dir / "model"
        shutil.rmtree(local, ignore_errors=True)
        local.mkdir(parents=True)
        model = self.raw_model
        if full_weights is not None:  # FSDP: the shards were gathered to this rank
            model.save_pretrained(str(local), state_dict=full_weights, safe_serialization=True)
        else:
            model.save_pretrained(str(local), safe_serialization=True)
        self.tokenizer.save_pretrained(str(local))
        if self.loaded.is_adapter and self.spec.output.merge_adapter:
            self._export_merged(local / "merged", local)
        best = None
        if best_uri is not None:
            best = {"uri": best_uri, "step": self.state.best_step, "metric": self.monitor, "value": self.state.best_metric}
        training = {k: summary[k] for k in ("steps", "total_steps", "stopped_early", "best_step", "best_metric", "monitor", "gain", "history", "evals")}
        training.update(precision=self.loaded.precision, target_modules=self.loaded.target_modules, world_size=self.dist.world_size,
                        distributed_strategy=self.strategy,
                        trainable_params=self.loaded.trainable_params, total_params=self.loaded.total_params)
        try:
            from .model_card import build_model_card

            card, markdown = build_model_card(
                job_name=self.config.name, spec=self.spec, data_report=self.data.report, baseline=summary["baseline"],
                final_eval=summary["final_eval"] or {}, test_eval=summary["test_eval"], calibration=summary["calibration"],
                retention=summary["retention"], best_checkpoint=best, training=training,
            )
        except Exception:  # noqa: BLE001 - a broken card must not throw away a finished training run
            log.exception("could not build the model card; writing a minimal one")
            card = {"jobName": self.config.name, "baseModel": self.spec.model.uri, "method": self.spec.method,
                    **{k: _public(v) if isinstance(v, dict) else v for k, v in summary.items() if k != "history"}}
            markdown = f"# {self.config.name}\n\nFine-tuned from {self.spec.model.uri} with {self.spec.method}.\n"
        import json

        (local / "model_card.json").write_text(json.dumps(card, indent=1, default=str))
        (local / "README.md").write_text(markdown)
        self.storage.delete_prefix(model_uri.rstrip("/") + "/")
        self.storage.upload_dir(str(local), model_uri)
        shutil.rmtree(local, ignore_errors=True)

    def _export_merged(self, dest: Path, adapter_dir: Path) -> None:
        """Base weights + adapter folded in, as a plain transformers model.

        The base is loaded afresh from the model folder in the compute precision (bf16 on GPU, fp32 on CPU)
        and the saved adapter applied to it, so QLoRA merges into full-precision weights, not the 4-bit
        ones it trained against (merging into a quantised base would be lossy).
        """
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        from .model import DTYPES

        config = copy.deepcopy(self.raw_model.get_base_model().config)  # with the task head's labels
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        auto = AutoModelForSequenceClassification if self.classification else AutoModelForCausalLM
        dtype = DTYPES["fp32" if self.loaded.precision == "fp32" else self.loaded.precision]
        base = auto.from_pretrained(self.model_dir, config=config, dtype=dtype, trust_remote_code=self.spec.model.trust_remote_code)
        merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
        merged.save_pretrained(str(dest), safe_serialization=True)
        self.tokenizer.save_pretrained(str(dest))


def run(config: JobConfig) -> dict[str, Any]:
    return Trainer(config).run()
