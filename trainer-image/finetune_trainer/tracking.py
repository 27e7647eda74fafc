"""Experiment tracking (``spec.tracking``): TensorBoard event files and an MLflow run, from rank 0 only.

The loop calls one small interface, :class:`Tracking`: ``on_params``, ``on_metrics(step, ...)``,
``on_data_report``, ``on_checkpoint``, ``on_artifacts`` and ``on_finish(success, model_uri)``. None of
them waits on a tracker, because a tracker must never fail or stall training:

- every call is queued to one background thread (a full queue drops what does not fit, with a warning);
- a backend whose call raises is dropped for the rest of the run after one warning, and the reason
  (secrets blanked) goes to ``progress.json``'s ``tracking.problem``, which the operator shows as
  ``status.tracking.problem``;
- MLflow's HTTP calls get short timeouts and few retries (:data:`MLFLOW_HTTP_DEFAULTS`, unless the pod's
  environment sets them), and :meth:`Tracking.on_finish` waits at most ``finish_timeout`` seconds.

TensorBoard: tensorboardX writes the events in the work folder (the lightest writer: it needs protobuf,
not TensorFlow or the tensorboard package) and :class:`~.storage.Storage` uploads them to
``<output>/tensorboard/`` at each checkpoint and at the end, with the job's own S3 endpoint and
credentials. A later attempt adds its own event file next to the earlier ones.

MLflow: mlflow-skinny's ``MlflowClient`` (the client without the server). One run per job: the run is
tagged ``finetune.runKey`` (a hash of the job's uid, or of the output URI outside Kubernetes) and a later
attempt of the same job finds and continues it, so a resumed job logs into one run. With
``FINETUNE_MLFLOW_PARENT_RUN_ID`` set, the run is nested under that run (tag ``mlflow.parentRunId``).
Otherwise a sweep's trial (``FINETUNE_SWEEP_NAME``/``_UID``/``_TRIAL``, from the operator, which never
talks to MLflow itself) is nested under the sweep's parent run in the same experiment, found by its tag
``finetune.sweepKey`` (a hash of the sweep's uid) or created, named after the sweep. Trials racing to
create it converge: the canonical parent is the earliest active one (start time, then run id), a trial
whose own parent lost deletes it, and at its end each trial looks again and re-points its tag. The parent
goes RUNNING when a trial starts and FINISHED when one ends, and gets ``trial/<monitored metric>`` (step =
trial number, the trial's best value, from :meth:`Tracking.on_result`). On success, ``tracking.mlflow.registerModel`` gets a new
model version whose source is the exported model's URI.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune_api import env as pod_env
from finetune_api.documents import TENSORBOARD_DIR, TrackingSummary
from finetune_api.spec import MLFLOW_CREDENTIAL_KEYS, FineTuneJobSpec

if TYPE_CHECKING:
    from .storage import Storage

log = logging.getLogger(__name__)

FINISH_TIMEOUT_S = 120.0  # on_finish: the queue drained, the run ended and the model registered, or given up
PREEMPT_TIMEOUT_S = 15.0  # on SIGTERM the pod's grace period also has to cover the checkpoint
QUEUE_LIMIT = 10_000
MLFLOW_HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",  # seconds per request (MLflow's default is 120)
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",  # MLflow's default is 7, with exponential backoff
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
}
RUN_KEY_TAG = "finetune.runKey"
JOB_TAG = "finetune.job"
OUTPUT_TAG = "finetune.output"
MODEL_URI_TAG = "finetune.modelUri"
PARENT_RUN_TAG = "mlflow.parentRunId"  # MLflow's own tag for nested runs
SWEEP_KEY_TAG = "finetune.sweepKey"  # on a sweep's parent run: a hash of the FineTuneSweep's uid
SWEEP_TAG = "finetune.sweep"  # the sweep's name, on its parent run
TRIAL_TAG = "finetune.sweepTrial"  # the trial's number, on a trial's run
SECRET_ENV = (*MLFLOW_CREDENTIAL_KEYS, "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
MAX_PROBLEM = 1000  # TrackingSummary.problem holds 1024 characters


def _redact(text: str) -> str:
    for name in SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())[:300]
    return _redact(f"{type(exc).__name__}: {text}" if text else type(exc).__name__)


# ------------------------------------------------------------------------------------ what is logged


def flat_params(spec: FineTuneJobSpec, **extra: Any) -> dict[str, Any]:
    """The run's hyperparameters as flat ``section.name`` keys with scalar values (what both TensorBoard's
    hparams and MLflow's params hold): the method, the model, the optimisation settings, the adapter."""
    out: dict[str, Any] = {"method": spec.method, "model.uri": spec.model.uri, "model.task": spec.model.task,
                           "dataset.format": spec.dataset.format}
    for section, model in (("hyperparameters", spec.hyperparameters), ("lora", spec.lora_or_default if spec.is_adapter else None)):
        if model is None:
            continue
        for key, value in model.model_dump(by_alias=True, mode="json").items():
            if value is None or isinstance(value, (dict, list)):
                value = json.dumps(value) if value is not None else "none"
            out[f"{section}.{key}"] = value
    out.update(extra)
    return out


def train_scalars(measured: Mapping[str, Any], *, lr: float, epoch: float) -> dict[str, float]:
    """One optimizer step's scalars, by the names both trackers use."""
    out = {"train/loss": measured.get("loss"), "train/learning_rate": lr, "train/epoch": epoch,
           "train/grad_norm": measured.get("grad_norm"), "train/padding_fraction": measured.get("padding")}
    seconds = measured.get("seconds") or 0
    if seconds > 0:
        out["train/tokens_per_second"] = measured.get("tokens", 0) / seconds
        out["train/samples_per_second"] = measured.get("samples", 0) / seconds
    return {k: float(v) for k, v in out.items() if isinstance(v, (int, float)) and v == v}


def eval_scalars(result: Mapping[str, Any] | None, prefix: str = "eval") -> dict[str, float]:
    """An evaluation result's numbers as ``<prefix>/<metric>`` (``eval_loss`` -> ``eval/loss``)."""
    out = {}
    for key, value in (result or {}).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value:
            out[f"{prefix}/{key.removeprefix('eval_')}"] = float(value)
    return out


# ------------------------------------------------------------------------------------------ backends


class Backend:
    """One tracker. Each method may raise: :class:`Tracking` catches it and drops the backend."""

    name = "tracker"

    def start(self) -> None: ...

    def params(self, params: dict[str, Any]) -> None: ...

    def metrics(self, step: int, values: dict[str, float]) -> None: ...

    def text(self, name: str, text: str) -> None: ...

    def artifacts(self, files: dict[str, str]) -> None: ...

    def checkpoint(self) -> None: ...

    def result(self, metric: str, value: float) -> None: ...

    def finish(self, success: bool | None, model_uri: str | None) -> None: ...


class TensorBoardBackend(Backend):
    """Event files written locally by tensorboardX, uploaded to ``uri`` through the job's Storage."""

    name = "tensorboard"

    def __init__(self, local_dir: Path, uri: str, storage: Storage, *, metric_names: tuple[str, ...] = ("train/loss", "eval/loss")):
        self.local_dir, self.uri, self.storage, self.metric_names = Path(local_dir), uri, storage, metric_names
        self.writer: Any = None
        self._session_end: Any = None

    @property
    def _writer(self) -> Any:
        """Opened at the first thing to write, so a run that fails before that leaves no event file behind."""
        if self.writer is None:
            from tensorboardX import SummaryWriter

            self.local_dir.mkdir(parents=True, exist_ok=True)
            self.writer = SummaryWriter(logdir=str(self.local_dir), flush_secs=30)
        return self.writer

    def params(self, params: dict[str, Any]) -> None:
        from tensorboardX.summary import hparams

        # Into this run's own folder (SummaryWriter.add_hparams would open a sub-run for them).
        exp, ssi, sei = hparams({k: v for k, v in params.items() if isinstance(v, (bool, int, float, str))},
                                {name: 0.0 for name in self.metric_names})
        self._writer.file_writer.add_summary(exp)
        self._writer.file_writer.add_summary(ssi)
        self._session_end = sei

    def metrics(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self._writer.add_scalar(tag, value, step)

    def text(self, name: str, text: str) -> None:
        # TensorBoard renders text as markdown: a fenced block keeps the report's columns.
        self._writer.add_text(name, f"```\n{text}\n```", 0)

    def checkpoint(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.storage.upload_dir(self.local_dir, self.uri)

    def finish(self, success: bool | None, model_uri: str | None) -> None:
        if self.writer is None:
            return
        if self._session_end is not None:
            self.writer.file_writer.add_summary(self._session_end)
        self.writer.close()
        self.storage.upload_dir(self.local_dir, self.uri)


@dataclass(frozen=True)
class SweepTrial:
    """The FineTuneSweep a job is a trial of (env ``FINETUNE_SWEEP_*``, set by the operator)."""

    name: str
    uid: str
    number: int

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> SweepTrial | None:
        name, uid, number = (environ.get(k, "") for k in (pod_env.SWEEP_NAME, pod_env.SWEEP_UID, pod_env.SWEEP_TRIAL))
        return cls(name, uid, int(number)) if name and uid and number.isdigit() else None

    @property
    def key(self) -> str:
        return hashlib.sha256(self.uid.encode()).hexdigest()[:32]


class MlflowBackend(Backend):
    """One MLflow run per job, through mlflow-skinny's ``MlflowClient``; a sweep's trial nested under the
    sweep's parent run (see :meth:`_sweep_parent`)."""

    name = "mlflow"

    def __init__(self, uri: str, *, experiment: str, job: str, run_key: str, output_uri: str, register_model: str | None,
                 storage: Storage | None = None, parent_run_id: str | None = None, sweep: SweepTrial | None = None,
                 on_ids: Callable[..., None] | None = None):
        self.uri, self.experiment, self.job, self.output_uri, self.storage = uri, experiment, job, output_uri, storage
        self.run_key = hashlib.sha256(run_key.encode()).hexdigest()[:32]  # a tag value the filter syntax needs no quoting for
        self.register_model, self.parent_run_id = register_model, parent_run_id
        self.sweep = sweep if not parent_run_id else None  # an explicit parent wins
        self.on_ids = on_ids or (lambda **_: None)
        self.client: Any = None
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.created_parent: str | None = None  # the sweep parent run this trial created, while it may still be deleted
        self.result_value: tuple[str, float] | None = None
        self.logged_params: dict[str, str] = {}  # what the run already holds (a continued run)

    def start(self) -> None:
        for name, value in MLFLOW_HTTP_DEFAULTS.items():
            os.environ.setdefault(name, value)
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        self.experiment_id = experiment_id = self._experiment_id()
        if self.sweep is not None:
            self.parent_run_id = self._sweep_parent()
            self.client.update_run(self.parent_run_id, status="RUNNING")
        found = self.client.search_runs([experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{self.run_key}'",
                                        max_results=1, order_by=["attributes.start_time DESC"])
        if found:  # a later attempt of this job: continue its run
            self.run_id = found[0].info.run_id
            self.logged_params = dict(found[0].data.params)
            self.client.update_run(self.run_id, status="RUNNING")
            if self.parent_run_id and found[0].data.tags.get(PARENT_RUN_TAG) != self.parent_run_id:
                self.client.set_tag(self.run_id, PARENT_RUN_TAG, self.parent_run_id)
            log.info("mlflow: continuing run %s (experiment %s)", self.run_id, self.experiment)
        else:
            tags = {RUN_KEY_TAG: self.run_key, JOB_TAG: self.job, OUTPUT_TAG: self.output_uri}
            if self.parent_run_id:
                tags[PARENT_RUN_TAG] = self.parent_run_id
            if self.sweep is not None:
                tags[SWEEP_TAG], tags[TRIAL_TAG] = self.sweep.name, str(self.sweep.number)
            self.run_id = self.client.create_run(experiment_id, tags=tags, run_name=self.job).info.run_id
            log.info("mlflow: run %s in experiment %s at %s", self.run_id, self.experiment, self.uri)
        self.on_ids(mlflow_run_id=self.run_id, mlflow_experiment_id=experiment_id)

    # A sweep's parent run. The trials of a sweep run in parallel pods, and MLflow has no unique constraint
    # or compare-and-set, so two trials may both find no parent and both create one. Each converges on the
    # same one: the canonical parent is the earliest active run with the sweep's key (start_time, then
    # run_id); a trial whose own parent lost deletes it, and each trial looks again when it finishes and
    # re-points its mlflow.parentRunId tag (tags are mutable), so all trials end under one parent.

    def _sweep_parents(self) -> list[Any]:
        assert self.sweep is not None
        runs = self.client.search_runs([self.experiment_id], filter_string=f"tags.`{SWEEP_KEY_TAG}` = '{self.sweep.key}'",
                                       max_results=1000)  # active runs only (the default view)
        return sorted(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id))

    def _sweep_parent(self) -> str:
        """The canonical parent run of this trial's sweep, created when there is none yet."""
        assert self.sweep is not None
        parents = self._sweep_parents()
        if not parents:
            tags = {SWEEP_KEY_TAG: self.sweep.key, SWEEP_TAG: self.sweep.name}
            self.created_parent = self.client.create_run(self.experiment_id, tags=tags, run_name=self.sweep.name).info.run_id
            log.info("mlflow: created parent run %s of sweep %s", self.created_parent, self.sweep.name)
            parents = self._sweep_parents()  # another trial may have created one meanwhile
        canonical = parents[0].info.run_id if parents else self.created_parent
        assert canonical is not None
        if self.created_parent and self.created_parent != canonical:
            log.info("mlflow: sweep %s already has parent run %s; deleting the one this trial created (%s)",
                     self.sweep.name, canonical, self.created_parent)
            self.client.delete_run(self.created_parent)
            self.created_parent = None
        return canonical

    def _finish_sweep(self) -> None:
        """At the end of a trial: the canonical parent once more (the tag re-pointed if it changed), the trial's
        result logged into it (step = trial number), and the parent marked FINISHED."""
        assert self.sweep is not None
        parent = self._sweep_parent()
        if parent != self.parent_run_id:
            log.info("mlflow: run %s re-pointed from parent %s to %s", self.run_id, self.parent_run_id, parent)
            self.client.set_tag(self.run_id, PARENT_RUN_TAG, parent)
            self.parent_run_id = parent
        if self.result_value is not None:
            from mlflow.entities import Metric

            metric, value = self.result_value
            self.client.log_batch(parent, metrics=[Metric(f"trial/{metric}", value, int(time.time() * 1000), self.sweep.number)])
        self.client.set_terminated(parent, "FINISHED")

    def result(self, metric: str, value: float) -> None:
        self.result_value = (metric, float(value))

    def _experiment_id(self) -> str:
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(self.experiment)
        if found is not None:
            if found.lifecycle_stage != "active":
                raise RuntimeError(f"experiment {self.experiment!r} is deleted on the server: restore it or name another one")
            return str(found.experiment_id)
        try:
            return str(self.client.create_experiment(self.experiment))
        except MlflowException as e:  # another job created it meanwhile
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            return str(self.client.get_experiment_by_name(self.experiment).experiment_id)

    def params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        values = {k[:250]: str(v)[:6000] for k, v in params.items()}
        # MLflow params are write-once: a continued run keeps the first attempt's values (an attempt with
        # another world size recomputes total_steps, for one); the change is logged here, not sent.
        changed = sorted(k for k, v in values.items() if self.logged_params.get(k, v) != v)
        if changed:
            log.info("mlflow: run %s keeps its first values of %s", self.run_id, ", ".join(changed))
        items = [Param(k, v) for k, v in values.items() if k not in self.logged_params]
        for i in range(0, len(items), 100):  # MLflow's per-request limit
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def metrics(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def artifacts(self, files: dict[str, str]) -> None:
        for name, text in files.items():
            self.client.log_text(self.run_id, text, name)

    def finish(self, success: bool | None, model_uri: str | None) -> None:
        error: Exception | None = None
        if success and model_uri:
            self.client.set_tag(self.run_id, MODEL_URI_TAG, model_uri)
            for step in (self._log_model_card, self._register):
                try:
                    step(model_uri)
                except Exception as e:  # noqa: BLE001 - the run still ends with the job's outcome; reported below
                    error = error or e
        self.client.set_terminated(self.run_id, {True: "FINISHED", False: "FAILED", None: "KILLED"}[success])
        if self.sweep is not None:
            try:
                self._finish_sweep()
            except Exception as e:  # noqa: BLE001 - reported below, like a refused registration
                error = error or e
        if error is not None:
            raise error

    def _log_model_card(self, model_uri: str) -> None:
        """The model card export.py wrote next to the model, as run artifacts."""
        if self.storage is None:
            return
        from .storage import join

        for name, artifact in (("README.md", "model_card.md"), ("model_card.json", "model_card.json")):
            self.client.log_text(self.run_id, self.storage.read_bytes(join(model_uri, name)).decode(), artifact)

    def _register(self, model_uri: str) -> None:
        from mlflow.exceptions import MlflowException

        if not self.register_model:
            return
        try:
            self.client.create_registered_model(self.register_model)
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        version = self.client.create_model_version(self.register_model, source=model_uri, run_id=self.run_id,
                                                   tags={JOB_TAG: self.job})
        log.info("mlflow: registered %s version %s (source %s)", self.register_model, version.version, model_uri)
        self.on_ids(mlflow_model_version=str(version.version))


# --------------------------------------------------------------------------------------- the facade


class Tracking:
    """What the loop calls. Disabled (every call a no-op) on ranks other than 0 and when nothing is asked for."""

    def __init__(self, backends: list[Backend], *, report: Callable[[TrackingSummary], None] | None = None,
                 summary: TrackingSummary | None = None, finish_timeout: float = FINISH_TIMEOUT_S, queue_limit: int = QUEUE_LIMIT):
        self.backends = backends
        self.report = report or (lambda _summary: None)
        self.summary = summary or TrackingSummary()
        self.finish_timeout = finish_timeout
        self.problems: dict[str, str] = {}
        self._dead: set[str] = set()
        self._lock = threading.Lock()
        self._queue: queue.Queue[tuple[str, tuple[Any, ...]] | None] = queue.Queue(maxsize=queue_limit)
        self._thread: threading.Thread | None = None
        self._dropped = False
        self._finished = False

    @classmethod
    def from_spec(cls, spec: FineTuneJobSpec, *, job: str, output_uri: str, storage: Storage, work_dir: Path, enabled: bool,
                  report: Callable[[TrackingSummary], None] | None = None) -> Tracking:
        from .storage import join

        if not enabled:
            return cls([])
        backends: list[Backend] = []
        summary = TrackingSummary()
        tracking = cls(backends, report=report, summary=summary)
        if spec.tracking.tensorboard:
            summary.tensorboard_uri = join(output_uri, TENSORBOARD_DIR)
            backends.append(TensorBoardBackend(work_dir / TENSORBOARD_DIR, summary.tensorboard_uri, storage))
        mlflow = spec.tracking.mlflow
        if mlflow is not None:
            backends.append(MlflowBackend(
                mlflow.uri, experiment=mlflow.experiment or os.environ.get(pod_env.NAMESPACE) or "finetune",
                job=job, run_key=os.environ.get(pod_env.JOB_UID) or output_uri, output_uri=output_uri,
                register_model=mlflow.register_model, storage=storage, parent_run_id=os.environ.get(pod_env.MLFLOW_PARENT_RUN_ID) or None,
                sweep=SweepTrial.from_env(), on_ids=tracking._set_ids,
            ))
        return tracking

    @property
    def enabled(self) -> bool:
        return bool(self.backends)

    # ----------------------------------------------------------------------------- the interface

    def start(self) -> None:
        if not self.enabled or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._work, name="finetune-tracking", daemon=True)
        self._thread.start()
        self._submit("start")
        self._publish()

    def on_params(self, params: dict[str, Any]) -> None:
        self._submit("params", params)

    def on_metrics(self, step: int, values: dict[str, float]) -> None:
        if values:
            self._submit("metrics", step, values)

    def on_data_report(self, report: Mapping[str, Any], text: str | None) -> None:
        """The data report: as text in TensorBoard, as ``data-report.json`` (and ``.txt``) in MLflow."""
        if text:
            self._submit("text", "data_report", text)
        files = {"data-report.json": json.dumps(report, indent=1, default=str)}
        if text:
            files["data-report.txt"] = text
        self._submit("artifacts", files)

    def on_artifacts(self, files: dict[str, str]) -> None:
        self._submit("artifacts", files)

    def on_checkpoint(self, step: int) -> None:
        self._submit("checkpoint")

    def on_result(self, metric: str, value: float | None) -> None:
        """The job's result (its monitored metric's best value), before :meth:`on_finish`: a sweep's trial logs
        it into the sweep's parent run as ``trial/<metric>``, step = the trial's number."""
        if value is not None and value == value:
            self._submit("result", metric, float(value))

    def on_finish(self, success: bool | None, model_uri: str | None = None) -> None:
        """End the run (``success`` None: preempted, to be continued) and wait for the queue, within bounds."""
        if not self.enabled or self._finished or self._thread is None:
            return
        self._finished = True
        timeout = self.finish_timeout if success is not None else min(self.finish_timeout, PREEMPT_TIMEOUT_S)
        self._submit("finish", success, model_uri, block=True, timeout=timeout)
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            pass
        self._thread.join(timeout)
        if self._thread.is_alive():
            for backend in self.backends:
                if backend.name not in self._dead:
                    self._fail(backend, f"did not finish within {timeout:g}s; the rest of its updates were not sent")

    # ------------------------------------------------------------------------------------ plumbing

    def _submit(self, method: str, *args: Any, block: bool = False, timeout: float | None = None) -> None:
        if not self.enabled or (self._finished and method != "finish"):
            return
        try:
            self._queue.put((method, args), block=block, timeout=timeout)
        except queue.Full:
            if not self._dropped:
                self._dropped = True
                log.warning("tracking is falling behind: updates dropped (queue of %d full)", self._queue.maxsize)

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            method, args = item
            for backend in self.backends:
                if backend.name in self._dead:
                    continue
                try:
                    getattr(backend, method)(*args)
                except Exception as e:  # noqa: BLE001 - a tracker must never fail training
                    self._fail(backend, f"{method} failed: {_one_line(e)}")

    def _fail(self, backend: Backend, why: str) -> None:
        with self._lock:
            self._dead.add(backend.name)
            self.problems[backend.name] = why
        log.warning("tracking: %s stopped (training goes on without it): %s", backend.name, why)
        self._publish()

    def _set_ids(self, **ids: str) -> None:
        with self._lock:
            for key, value in ids.items():
                setattr(self.summary, key, value)
        self._publish()

    def _publish(self) -> None:
        with self._lock:
            problem = "; ".join(f"{name}: {why}" for name, why in sorted(self.problems.items()))
            self.summary.problem = problem[:MAX_PROBLEM] or None
            summary = self.summary.model_copy()
        try:
            self.report(summary)
        except Exception as e:  # noqa: BLE001
            log.warning("tracking: could not report the tracking summary: %s", e)
