"""Stage 4: the training run, top to bottom.

    config -> setup (data, model, optimizer, eval) -> baseline -> [train step, eval, checkpoint]* -> best model
           -> final report (report.py) -> export (export.py)

:meth:`Trainer.run` reads like that list, and :meth:`Trainer.setup` like its first half: each
``_setup_*`` returns what it builds, so every attribute is born in ``__init__`` or ``setup``. The loop
is ours (not ``transformers.Trainer``) because the guarantees the operator relies on live in it: exact
resume (the data order is a pure function of seed and epoch, see :mod:`.collate`; weights, optimizer,
scheduler and every rank's RNG come back from the checkpoint), a clean checkpoint-and-exit on SIGTERM,
and only rank 0 touching shared storage. accelerate provides the process group (DDP from the torchrun
environment), mixed precision and gradient sync.

Gradient accumulation: a window of ``gradientAccumulationSteps`` micro-batches on every rank is one
optimizer step, and its loss is the mean token loss of the whole global batch however the rows fall into
micro-batches and ranks (:mod:`.loss`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from finetune_api import env as pod_env
from finetune_api import metric_catalogue
from finetune_api.documents import DATA_REPORT_FILE, RegressionResult
from finetune_api.metric_catalogue import Direction

from . import distributed
from .attention import verify_packing
from .checkpoint import CheckpointManager
from .collate import Batching, make_collator, rows_of, token_counts
from .config import JobConfig
from .distributed import DistInfo, dist_info
from .errors import InvalidConfig, ParentModelInvalid, TrainerError
from .early_stopping import EarlyStopping, improves
from .evaluator import Evaluator
from .lineage import (Parent, effective_spec, enforce, gate_metric, lineage_card, load_parent_test_set, merge_adapters, parent_test_metrics,
                      regression_gate, report_bytes, save_test_set)
from .loss import WindowLoss
from .metrics import TrainerMetrics
from .model import DEFAULT_CACHE_DIR, LoadedModel, check_hardware, load_model, load_tokenizer, resolve_model_dir
from .optim import build_optimizer, build_scheduler
from .preemption import Preempted, SigtermFlag
from .progress import ProgressWriter
from .report import RunSummary, final_report, measure_baseline, public
from .resume import maybe_resume
from .state import HISTORY_LIMIT, TrainerState, thin_history
from .storage import Storage, join
from .tracking import Tracking, eval_scalars, flat_params, train_scalars

if TYPE_CHECKING:
    from accelerate import Accelerator
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from .collate import Collator
    from .distill import Teacher
    from .data.prepare import PreparedData
    from .parallel import ModelState

log = logging.getLogger(__name__)

DEFAULT_WORK_DIR = "/tmp/finetune-work"  # outside a pod (the operator sets FINETUNE_WORK_DIR to an emptyDir)
GENERATION_EVAL_SAMPLES = 32  # validation prompts completed at each evaluation when bleu/rouge are asked for

__all__ = ["HISTORY_LIMIT", "Preempted", "Trainer", "TrainerState", "run", "thin_history"]


def _finite(x: Any) -> float | None:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


class Trainer:
    def __init__(self, config: JobConfig, *, work_dir: str | Path | None = None):
        self.config = config
        self.parent = Parent.from_env(config.spec)  # model.fromJob, as the operator resolved it (None without)
        self.spec = effective_spec(config.spec, self.parent)
        self.hp = config.spec.hyperparameters
        self.dist: DistInfo = dist_info()
        self.classification = self.spec.is_classification
        self.storage = Storage.from_spec(self.spec.storage)
        self.join = join
        self.output = config.output_uri
        self.checkpoint_output = self.output  # where checkpoints/ lives: a fold's own folder under dataset.crossValidation
        self.work_dir = Path(work_dir or os.environ.get(pod_env.WORK_DIR, DEFAULT_WORK_DIR)) / config.name
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.metrics = TrainerMetrics(config.name, self.dist.rank)
        self.progress = ProgressWriter(self.storage, self.output, enabled=self.dist.is_main, join=join)
        self.tracking = Tracking.from_spec(self.spec, job=config.name, output_uri=self.output, storage=self.storage, work_dir=self.work_dir,
                                           enabled=self.dist.is_main, report=lambda summary: self.progress.update(force=True, tracking=summary))
        self.sigterm = SigtermFlag()
        self.state = TrainerState()
        es = self.spec.evaluation.early_stopping
        self.monitor = es.metric if es else "eval_loss"
        self.monitor_mode: Direction = es.direction if es else "min"  # which way is better: early stopping, best model
        task = "preference" if self.spec.is_preference else self.spec.model.task
        known = metric_catalogue.monitorable(task, self.spec.evaluation.metrics)
        if self.monitor not in known:
            raise InvalidConfig(f"evaluation.earlyStopping.metric {self.monitor!r} is not computed for this task; use one of {', '.join(known)}")
        self.regression_metric = gate_metric(self.spec, self.monitor) if self.parent else None
        if self.parent and self.spec.evaluation.regression and not self.parent.lineage.parent_test_set_uri:
            raise ParentModelInvalid(f"evaluation.regression needs the parent's test set, and FineTuneJob {self.parent.lineage.parent_job} "
                                     "stored none (it had no test split, or an older trainer ran it)")

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
            self.tracking.on_finish(None)
            raise
        except Exception as e:
            self.tracking.on_finish(False)
            # Tell the operator which stage failed; __main__ still writes the termination message.
            line = e.line() if isinstance(e, TrainerError) else f"{type(e).__name__}: {str(e).strip()[:300]}"
            self.progress.update(force=True, stage="failed", failureReason=line)
            raise
        finally:
            self.sigterm.restore()
            self.metrics.close()

    def _run(self) -> dict[str, Any]:
        self.tracking.start()
        self.setup()
        if self.spec.dataset.cross_validation is not None:
            from .crossval import run_folds

            run_folds(self)  # K fold trainings; then this trainer is set up for the refit on all non-test rows
        self.tracking.on_params(flat_params(self.spec, job=self.config.name, total_steps=self.state.total_steps,
                                            world_size=self.dist.world_size, distributed_strategy=self.strategy))
        resumed_from = maybe_resume(self)
        if resumed_from is None:
            # Different dropout streams per rank; a resumed run gets each rank's own stream back instead.
            torch.manual_seed(self.hp.seed + 1000 * self.dist.rank)
        if resumed_from is None and (self.spec.evaluation.baseline or self.evaluator.retention_loader() is not None):
            self._stage("baseline")
            self.state.baseline, self.state.retention_before = measure_baseline(self.evaluator)

        self._stage("training", total_steps=self.state.total_steps, best_metric_name=self.monitor)
        self._train()
        self.checkpoints.wait()
        return self._finish()

    # ------------------------------------------------------------------------------------- setup

    def setup(self) -> None:
        """Everything before the first step, in order; each stage returns what it builds."""
        from transformers import set_seed

        check_hardware(self.spec)
        if self.spec.distillation is not None:
            from .distill import resolve_teacher_precision

            resolve_teacher_precision(self.spec.distillation.teacher.precision)  # fp16 without a GPU: fail now, not after the data
        set_seed(self.hp.seed)
        self._stage("preparing-data")
        self.model_dir, self.tokenizer, self.data = self._setup_data()
        self.num_labels = len(self.data.labels) if self.data.labels else self.spec.model.num_labels
        if self.spec.dataset.cross_validation is None:  # else crossval.run_folds sets up each fold, then the refit
            self.setup_training()

    def setup_training(self) -> None:
        """Model, optimizer, evaluation and checkpoints for ``self.data`` (again per fold under dataset.crossValidation)."""
        self._stage("loading-model")
        self.strategy, self.loaded, self.accelerator = self._setup_model()
        self.teacher = self._setup_teacher()
        self.batching, self.collate, self.loss = self._setup_batches()
        self.steps_per_epoch = math.ceil(self.batching.batches_per_epoch / self.hp.gradient_accumulation_steps)
        self.state.total_steps = self.hp.max_steps or max(1, math.ceil(self.hp.total_epochs * self.steps_per_epoch))
        self.state.world_size = self.dist.world_size
        self.model, self.optimizer, self.scheduler, self.raw_model, self.model_state = self._setup_optimizer(self.loaded)
        if self.spec.is_preference and self.loss.needs_reference:  # DPO: the base model's log-probs, before any step
            self._setup_reference()
        self.early_stopping, self.evaluator = self._setup_eval()
        self.checkpoints = self._setup_checkpoints()
        self.metrics.set_total_steps(self.state.total_steps)

    def _setup_data(self) -> tuple[str, PreTrainedTokenizerBase, PreparedData]:
        """The base model's folder and tokenizer, then the prepared data (its report published)."""
        from .data.shared import prepare_data_per_node

        source = self.parent.model_source if self.parent else self.spec.model.uri
        assert source is not None  # the spec requires model.uri or model.fromJob
        model_dir = resolve_model_dir(source, self.storage, self.dist, cache_dir=os.environ.get(pod_env.CACHE_DIR))
        tokenizer = load_tokenizer(model_dir, self.spec)
        # Local rank 0 prepares the (deterministic) data for its node; the other local ranks map the same files.
        data = prepare_data_per_node(self.spec, self.storage, tokenizer, root=self.work_dir, local_rank=self.dist.local_rank,
                                     local_world_size=self.dist.local_world_size)
        self._publish_data_report(data)
        if self.parent and self.parent.adapters:  # an adapter parent: its chain merged into its base, then trained on
            model_dir = merge_adapters(model_dir, self.parent, self.spec, self.storage, self.dist, labels=data.labels,
                                       cache_root=Path(os.environ.get(pod_env.CACHE_DIR) or DEFAULT_CACHE_DIR))
        return model_dir, tokenizer, data

    def _publish_data_report(self, data: PreparedData) -> None:
        report_uri = self.join(self.output, DATA_REPORT_FILE)
        summary = data.summary(report_uri).model_dump()
        summary["report_uri"] = report_uri
        self.metrics.on_data(summary)
        body, summary["report_digest"] = report_bytes(data.report)
        if self.dist.is_main:
            self.storage.write_bytes(report_uri, body)
            self.progress.set_data(summary)
            test_set = save_test_set(data.test, data.labels, work_dir=self.work_dir, storage=self.storage, output=self.output)
            if test_set:  # for the jobs that start from this one (model.fromJob)
                self.progress.update(force=True, test_set_uri=test_set)
        text = None
        try:
            from .data import format_report

            text = format_report(data.report)
            for line in text.splitlines():
                log.info("data: %s", line)
        except Exception:  # noqa: BLE001 - the report is informative only
            pass
        self.tracking.on_data_report(data.report, text)

    def _setup_model(self) -> tuple[str, LoadedModel, Accelerator]:
        """The distributed strategy, the loaded model and the accelerator (which joins the process group)."""
        from transformers import set_seed

        from .model import count_parameters
        from .parallel import FSDP, choose_strategy, make_accelerator

        # The strategy depends on the model's size (counted from its config), and under FSDP only rank 0
        # reads the weights. The process group is joined only after loading (creating the Accelerator
        # does that under torchrun); nothing before this point is a collective.
        strategy = choose_strategy(self.hp.distributed_strategy, method=self.spec.method, world_size=self.dist.world_size,
                                   total_params=count_parameters(self.model_dir, self.spec) if self.dist.distributed else 0)
        if self.dist.distributed:
            log.info("distributed strategy: %s over %d processes", strategy, self.dist.world_size)
        set_seed(self.hp.seed)  # the new head / adapter init does not depend on what data prep consumed
        loaded = load_model(self.model_dir, self.spec, labels=self.data.labels, tokenizer=self.tokenizer, dist=self.dist,
                            empty=strategy == FSDP and not self.dist.is_main)
        accelerator = make_accelerator(loaded.precision)
        if self.hp.packing and not self.classification:
            # Fail now, not after training on rows that saw each other, if this architecture ignores the row boundaries.
            verify_packing(loaded.model, [list(self.data.train[i]["input_ids"]) for i in range(min(2, len(self.data.train)))],
                           is_main=self.dist.is_main)
        return strategy, loaded, accelerator

    def _setup_teacher(self) -> Teacher | None:
        """spec.distillation's teacher, checked against the student and frozen on this process's device (each rank holds one)."""
        if self.spec.distillation is None:
            return None
        from .distill import load_teacher

        self._stage("loading-teacher")
        teacher = load_teacher(self.spec, self.storage, self.dist, student_tokenizer=self.tokenizer, student_model=self.loaded.model,
                               labels=self.data.labels, num_labels=self.num_labels, device=self.accelerator.device,
                               cache_dir=os.environ.get(pod_env.CACHE_DIR))
        if self.hp.packing and not self.classification:
            try:  # the teacher reads the same packed rows: it must keep them apart too
                verify_packing(teacher.model, [list(self.data.train[i]["input_ids"]) for i in range(min(2, len(self.data.train)))],
                               is_main=self.dist.is_main)
            except InvalidConfig as e:
                raise InvalidConfig(f"distillation.teacher.uri {teacher.uri}: {e.message}") from None
        return teacher

    def _setup_reference(self) -> None:
        """Objective dpo: attach the base model's log-probabilities of every pair to the datasets (see .preference)."""
        from .preference import attach_reference

        attach_reference(self.data, self.raw_model, batch_size=self.hp.batch_size, pad_token_id=self.tokenizer.pad_token_id,
                         device=self.accelerator.device, is_adapter=self.loaded.is_adapter, accelerator=self.accelerator)

    def _setup_batches(self) -> tuple[Batching, Collator, WindowLoss]:
        """Which rows form each micro-batch on this rank, how they are collated, and the loss (with class weights)."""
        hp = self.hp
        batching = Batching(len(self.data.train), hp.batch_size, self.dist.world_size, self.dist.rank, hp.seed)
        collate = make_collator(classification=self.classification, packing=hp.packing, pad_token_id=self.tokenizer.pad_token_id)
        if self.spec.is_seq2seq:
            from .seq2seq import Seq2SeqCollator, decoder_inputs_of

            collate = Seq2SeqCollator(self.tokenizer.pad_token_id, decoder_inputs_of(self.loaded.model))
        if self.spec.is_preference:
            from .preference import PairCollator, PreferenceLoss

            return batching, PairCollator(self.tokenizer.pad_token_id), PreferenceLoss.from_spec(self.spec)  # type: ignore[return-value]
        class_weights = None
        if self.classification and self.data.class_weights and self.spec.dataset.preprocessing.class_weights:
            class_weights = torch.tensor(self.data.class_weights, dtype=torch.float32, device=self.accelerator.device)
        return batching, collate, WindowLoss(self.classification, class_weights, shift=not self.spec.is_seq2seq, teacher=self.teacher)

    def _setup_optimizer(self, loaded: LoadedModel) -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler, PreTrainedModel, ModelState]:
        """(model, optimizer, scheduler, unwrapped model, ModelState), the model sharded first under FSDP."""
        from .parallel import FSDP, ModelState, shard

        model = loaded.model
        if self.strategy == FSDP:
            model = shard(model, loaded.precision, is_main=self.dist.is_main)  # before the optimizer: sharding replaces the parameters
        optimizer = build_optimizer(model, self.hp)
        scheduler = build_scheduler(optimizer, self.hp, self.state.total_steps)  # not prepared: we step it once per step
        if self.strategy == FSDP:
            model, optimizer = model, self.accelerator.prepare(optimizer)
        else:
            model, optimizer = self.accelerator.prepare(model, optimizer)
        raw_model = self.accelerator.unwrap_model(model)
        return model, optimizer, scheduler, raw_model, ModelState(self.strategy, model, raw_model, optimizer, is_main=self.dist.is_main)

    def _setup_eval(self) -> tuple[EarlyStopping | None, Evaluator]:
        """Early stopping (evaluation.earlyStopping) and the evaluator (with the validation loader, when there is data)."""
        es = self.spec.evaluation.early_stopping
        evaluator = Evaluator(self.spec, self.dist, accelerator=self.accelerator, tokenizer=self.tokenizer, data=self.data,
                              num_labels=self.num_labels, model=self.raw_model, sharded=self.model_state.sharded)
        return (EarlyStopping.from_spec(es) if es else None), evaluator

    def _setup_checkpoints(self) -> CheckpointManager:
        checkpoints = CheckpointManager(
            self.storage, self.checkpoint_output, self.work_dir / "checkpoints", self.dist,
            keep_last=self.spec.checkpoint.keep_last, is_adapter=self.loaded.is_adapter, join=self.join,
        )
        checkpoints.on_complete = self._on_checkpoint_complete
        return checkpoints

    @property
    def scaler(self) -> Any:
        return getattr(self.accelerator, "scaler", None)

    # -------------------------------------------------------------------------------------- train

    def _windows(self) -> Iterator[tuple[int, int, list[list[int]]]]:
        """(epoch, first micro-batch index, [row index lists]) for every remaining optimizer step, forever."""
        epoch, batch, accum = self.state.epoch, self.state.batch, self.hp.gradient_accumulation_steps
        while True:
            remaining = self.batching.epoch_batches(epoch, start_batch=batch)
            for i in range(0, len(remaining), accum):
                yield epoch, batch + i, remaining[i : i + accum]
            epoch, batch = epoch + 1, 0

    def _optimizer_step(self, window: list[list[int]]) -> dict[str, Any]:
        """Forward/backward over one accumulation window, clip, step. Returns what the step measured."""
        t0 = time.monotonic()
        device = self.accelerator.device
        self.model.train()
        batches = [{k: v.to(device) for k, v in self.collate(rows_of(self.data.train, rows)).items()} for rows in window]
        denominator = self.loss.denominator(batches)  # all ranks' loss tokens / world size (a collective)
        window_loss = torch.zeros((), device=device)
        real = total = 0
        for i, batch in enumerate(batches):
            # Gradients are all-reduced once per window, on its last micro-batch.
            sync = contextlib.nullcontext() if i == len(batches) - 1 else self.model_state.no_sync(self.accelerator)
            with sync, self.accelerator.autocast():
                loss = self.loss(self.model, batch, denominator)
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
            # Each rank's window_loss is its token-loss sum x world / N_global: their mean is the global per-token mean.
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
                self.tracking.on_metrics(st.step, train_scalars(measured, lr=lr, epoch=fractional_epoch))
                self.progress.update(step=st.step, epoch=fractional_epoch, train_loss=_finite(measured["loss"]), learning_rate=lr)
                log.info("step %d/%d epoch %.2f loss %.4f lr %.3g", st.step, st.total_steps, fractional_epoch, measured["loss"], lr)

                # Evaluate, then decide whether to checkpoint and whether to stop.
                last = st.step >= st.total_steps
                due = (ev.strategy == "steps" and st.step % ev.every_steps == 0) or (ev.strategy == "epoch" and epoch_done)
                new_best = self._eval_step() if self.evaluator.validation is not None and (due or last) else False
                stop_early = self.early_stopping is not None and self.early_stopping.should_stop
                preempt = distributed.any_rank(self.sigterm.requested)
                keep_best = new_best and self.use_best
                if st.step % self.spec.checkpoint.every_steps == 0 or last or stop_early or preempt or keep_best:
                    st.stopped_early = stop_early
                    self._save()
                if preempt:
                    self.checkpoints.wait()
                    self._stage("preempted", step=st.step)
                    raise Preempted(f"SIGTERM: checkpointed at step {st.step}")
                if stop_early and self.early_stopping is not None:
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
        result = public(self.evaluator.evaluate()) or {}
        if self.evaluator.generation:
            # Scored on rank 0 (every rank under FSDP); the decision to stop must be the same everywhere.
            scores = distributed.broadcast_object(self.evaluator.generation_metrics(self.data.validation, GENERATION_EVAL_SAMPLES))
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
        self.tracking.on_metrics(st.step, eval_scalars(result))
        self.progress.update(force=True, eval_loss=_finite(result.get("eval_loss")), best_metric=_finite(st.best_metric), best_metric_name=self.monitor)
        log.info("eval at step %d: %s", st.step, {k: round(v, 4) for k, v in entry.items() if isinstance(v, float)})
        return new_best

    def _save(self) -> None:
        st = self.state
        last_eval = st.evals[-1] if st.evals else {}
        st.checkpoint_metrics[str(st.step)] = _finite(last_eval.get(self.monitor)) if last_eval.get("step") == st.step else None
        best_step = st.best_step if self.use_best else None
        self.checkpoints.save(st.step, model_state=self.model_state, scheduler=self.scheduler,
                              scaler=self.scaler, state=st.to_dict(), best_step=best_step)

    def _on_checkpoint_complete(self, step: int, uri: str, seconds: float, nbytes: int) -> None:
        self.metrics.on_checkpoint(step, seconds, nbytes)
        self.tracking.on_checkpoint(step)
        kept = {c.step for c in self.checkpoints.complete()}
        self.progress.add_checkpoint(step, uri, self.state.checkpoint_metrics.get(str(step)), kept_steps=kept)

    # ------------------------------------------------------------------------------------- finish

    @property
    def use_best(self) -> bool:
        """Keep the best checkpoint and finish with its weights (evaluation.useBestModel, with validation data)."""
        return self.spec.evaluation.use_best_model and self.evaluator.validation is not None

    def _finish(self) -> dict[str, Any]:
        """Best weights back, the final report, then the model published (rank 0) and the run's summary returned."""
        from .export import export_model

        st = self.state
        best_checkpoint = self._restore_best()
        self._stage("testing")
        evaluation = final_report(self.evaluator, self.state, self.monitor, self.monitor_mode)
        if self.teacher is not None:
            from .distill import teacher_metrics

            evaluation.teacher = teacher_metrics(self.evaluator, self.teacher)  # beside the student's, in the report and the card
        if evaluation.gain is not None:
            g = evaluation.gain
            self.progress.set_gain(g["metric"], _finite(g["baseline"]), _finite(g["final"]), split=g["split"], baseline_kind=g["baseline_kind"])
        regression = self._regression_gate(evaluation)  # action fail raises here: nothing is exported
        summary = RunSummary.of(self, evaluation, best_checkpoint)
        summary.lineage = lineage_card(self.parent, regression) if self.parent else None
        if self.spec.dataset.cross_validation is not None:
            from .crossval import finish as cross_validation_summary

            summary.cross_validation = cross_validation_summary(self)
        # Replicas must end identical; the checksum in every rank's log makes a divergence visible.
        log.info("final trainable parameter checksum %.12e", self.model_state.checksum())
        model_uri = self.join(self.output, "model")
        self.progress.update(force=True, evaluation={
            "baseline": st.baseline, "final": evaluation.final, "test": evaluation.test,
            "calibration": evaluation.calibration, "retention": evaluation.retention, "teacher": evaluation.teacher,
        })
        full_weights = self.model_state.gather_full_model()  # a collective under FSDP, None otherwise
        if self.dist.is_main:
            self._stage("saving")
            export_model(summary, model_uri, model=self.raw_model, tokenizer=self.tokenizer, loaded=self.loaded,
                         model_dir=self.model_dir, work_dir=self.work_dir, storage=self.storage, full_weights=full_weights)
        del full_weights
        distributed.barrier()
        self.tracking.on_metrics(st.step, {**eval_scalars(evaluation.final, "final"), **eval_scalars(evaluation.test, "test")})
        self.tracking.on_result(self.monitor, st.best_metric)  # a sweep's trial: into the sweep's parent run
        self.tracking.on_finish(True, model_uri)
        self._stage("done", model_uri=model_uri)
        return {**summary.to_dict(), "model_uri": model_uri}

    def _regression_gate(self, evaluation: Any) -> RegressionResult | None:
        """model.fromJob: this model on the parent's test set against the parent's recorded value (a collective)."""
        if self.parent is None or self.regression_metric is None:
            return None
        if not self.parent.lineage.parent_test_set_uri:
            log.warning("regression gate skipped: the parent %s stored no test set", self.parent.lineage.parent_job)
            return None
        parent_metrics = parent_test_metrics(self.parent, self.storage)
        dataset = load_parent_test_set(self.parent, self.spec, self.storage, work_dir=self.work_dir, labels=self.data.labels,
                                       vocab_size=int(self.raw_model.get_input_embeddings().num_embeddings), rank=self.dist.rank)
        loader = self.evaluator.loader(dataset)
        kwargs: dict[str, Any] = {}
        if self.classification and evaluation.calibration:  # each model at its own calibrated temperature, as deployed
            kwargs["temperature"] = evaluation.calibration["temperature"]
        measured = public(self.evaluator.evaluate(loader, **kwargs)) or {}
        result = regression_gate(self.regression_metric, _finite(parent_metrics.get(self.regression_metric)),
                                 _finite(measured.get(self.regression_metric)), self.spec.evaluation.regression, test_rows=len(dataset))
        log.info("regression gate: %s", result.wire())
        self.progress.update(force=True, regression=result)  # recorded first, whatever the action
        enforce(result)
        return result

    def _restore_best(self) -> dict[str, Any] | None:
        """With useBestModel, load the best checkpoint's weights; what the card says about it (None without one)."""
        st = self.state
        if not self.use_best or st.best_step is None:
            return None
        uri = self.checkpoints.uri_for(st.best_step)
        if st.best_step != st.step:
            log.info("restoring the best checkpoint (step %d, %s %.4g)", st.best_step, self.monitor, st.best_metric)
            self.checkpoints.load_weights(uri, self.model_state)
        return {"uri": uri, "step": st.best_step, "metric": self.monitor, "value": st.best_metric}


def run(config: JobConfig) -> dict[str, Any]:
    return Trainer(config).run()
