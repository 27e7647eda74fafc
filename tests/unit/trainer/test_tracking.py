"""Experiment tracking (spec.tracking): a real MLflow server and TensorBoard event files read back with
TensorBoard's own reader, from a real run of the tiny Llama; and a tracker that is down or hangs,
which must not fail or stall training."""

from __future__ import annotations

import json
import threading
import time

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from finetune_trainer.tracking import Backend, Tracking, eval_scalars, flat_params, train_scalars
from helpers_assets import assets, free_port, lm_spec, run_trainer, write_config  # noqa: F401

STEPS = 6


def _progress(out):
    return json.loads((out / "progress.json").read_text())


def _spec(assets, out, **tracking):
    return lm_spec(assets, str(out), hyperparameters={"maxSteps": STEPS}, evaluation={"strategy": "steps", "everySteps": 3, "baseline": False},
                   checkpoint={"everySteps": 3, "keepLast": 1}, dataset={"split": {"validation": 0.1, "test": None}},
                   tracking=tracking)


def _events(folder):
    ea = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    return ea


def _s3_json(s3, uri):
    bucket, key = uri.removeprefix("s3://").split("/", 1)
    return json.loads(s3.client().get_object(Bucket=bucket, Key=key)["Body"].read())


@pytest.mark.slow
def test_mlflow_run_and_tensorboard_events_hold_what_the_trainer_computed(assets, tmp_path, s3, mlflow_server, monkeypatch):
    """Output in S3 (MinIO): the registered version's source is the exported model's s3:// URI (the MLflow
    server refuses local paths outside a run's artifacts), and TensorBoard reads the events from S3."""
    from mlflow.tracking import MlflowClient

    out = f"s3://{s3.create_bucket('tracking')}/runs/tiny"
    spec = _spec(assets, out, mlflow={"uri": mlflow_server.url, "experiment": "unit-tracking", "registerModel": "tiny-lm"})
    r = run_trainer(write_config(tmp_path / "job.yaml", spec, name="tiny-lm-tracked"), tmp_path, **s3.env(base={}),
                    FINETUNE_JOB_UID="uid-1", FINETUNE_MLFLOW_PARENT_RUN_ID="parent-123")
    assert r.returncode == 0, r.stderr[-3000:]
    state = _s3_json(s3, f"{out}/checkpoints/step-{STEPS:08d}/trainer_state.json")
    losses = [h["loss"] for h in state["history"]]
    evals = {e["step"]: e["eval_loss"] for e in state["evals"]}
    assert len(losses) == STEPS and sorted(evals) == [3, 6]

    progress = _s3_json(s3, f"{out}/progress.json")
    tracking = progress["tracking"]
    assert "problem" not in tracking, tracking
    assert tracking["tensorboardUri"] == f"{out}/tensorboard" and tracking["mlflowModelVersion"] == "1"

    client = MlflowClient(tracking_uri=mlflow_server.url)
    experiment = client.get_experiment_by_name("unit-tracking")
    assert tracking["mlflowExperimentId"] == experiment.experiment_id
    runs = client.search_runs([experiment.experiment_id])
    assert [run.info.run_id for run in runs] == [tracking["mlflowRunId"]]
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny-lm-tracked"
    assert run.data.tags["mlflow.parentRunId"] == "parent-123"  # an explicit parent (a sweep trial without one gets the sweep's parent run)
    assert run.data.tags["finetune.modelUri"] == f"{out}/model"
    # Params: the spec's hyperparameters, flattened.
    assert run.data.params["hyperparameters.learningRate"] == "0.01" and run.data.params["method"] == "lora"
    assert run.data.params["lora.r"] == "8" and run.data.params["total_steps"] == str(STEPS)
    # Per-step metric history: the very values the trainer computed (its checkpointed history).
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == list(zip(range(1, STEPS + 1), losses))
    assert [m.value for m in client.get_metric_history(run.info.run_id, "train/learning_rate")] == [h["lr"] for h in state["history"]]
    assert {m.step: m.value for m in client.get_metric_history(run.info.run_id, "eval/loss")} == evals
    assert all(m.value > 0 for m in client.get_metric_history(run.info.run_id, "train/tokens_per_second"))
    assert run.data.metrics["final/loss"] == progress["evaluation"]["final"]["eval_loss"]
    # Artifacts (the server keeps them in MinIO): the data report and the model card as the trainer wrote them.
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"data-report.json", "data-report.txt", "model_card.json", "model_card.md"} <= names
    local = client.download_artifacts(run.info.run_id, "data-report.json", str(tmp_path / "dl"))
    assert json.loads(open(local).read()) == _s3_json(s3, f"{out}/data-report.json")
    card = client.download_artifacts(run.info.run_id, "model_card.json", str(tmp_path / "dl"))
    assert json.loads(open(card).read()) == _s3_json(s3, f"{out}/model/model_card.json")
    # The registered model version points at the exported model.
    (version,) = client.search_model_versions("name='tiny-lm'")
    assert (version.version, version.source, version.run_id) == ("1", f"{out}/model", run.info.run_id)

    # TensorBoard's own reader, straight from <output>/tensorboard/ in S3 (what `tensorboard --logdir s3://...` reads).
    for name, value in s3.env(base={}).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("S3_ENDPOINT", s3.endpoint_url)
    import boto3

    # tensorboard's reader uses boto3's default session, which keeps the credentials it first resolved: an earlier
    # test of this process (another S3 server, other keys) must not decide which keys this read sends.
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)
    ea = _events(f"{out}/tensorboard")
    scalars = ea.Scalars("train/loss")
    assert [s.step for s in scalars] == list(range(1, STEPS + 1))
    assert [s.value for s in scalars] == pytest.approx(losses, rel=1e-6)  # event files hold float32
    assert {s.step: s.value for s in ea.Scalars("eval/loss")} == pytest.approx(evals, rel=1e-6)
    assert {"train/learning_rate", "train/tokens_per_second", "train/grad_norm", "final/loss"} <= set(ea.Tags()["scalars"])
    (text,) = ea.Tensors("data_report/text_summary")
    assert "rows" in text.tensor_proto.string_val[0].decode()
    content = ea.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["hyperparameters.learningRate"].number_value == 0.01
    assert start.hparams["method"].string_value == "lora"


@pytest.mark.slow
def test_a_tracker_that_is_down_does_not_fail_training(assets, tmp_path):
    out = tmp_path / "out"
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    spec = _spec(assets, out, mlflow={"uri": down})
    t0 = time.monotonic()
    r = run_trainer(write_config(tmp_path / "job.yaml", spec), tmp_path, MLFLOW_TRACKING_PASSWORD="s3cret-pass-word")
    assert r.returncode == 0, r.stderr[-3000:]
    assert time.monotonic() - t0 < 120
    progress = _progress(out)
    assert progress["stage"] == "done"
    problem = progress["tracking"]["problem"]
    assert problem.startswith("mlflow: start failed: ") and "tensorboard" not in problem
    assert "s3cret-pass-word" not in r.stderr + json.dumps(progress)
    assert r.stderr.count("tracking: mlflow stopped") == 1  # one warning, not one per step
    # TensorBoard went on without it.
    assert [s.step for s in _events(out / "tensorboard").Scalars("train/loss")] == list(range(1, STEPS + 1))


class _Hanging(Backend):
    name = "hanging"

    def __init__(self):
        self.release = threading.Event()

    def metrics(self, step, values):
        self.release.wait(30)


class _Recording(Backend):
    name = "recording"

    def __init__(self):
        self.calls = []

    def start(self):
        raise ConnectionError("refused")

    def params(self, params):
        self.calls.append("params")


def test_a_hanging_tracker_costs_at_most_the_finish_timeout():
    hanging = _Hanging()
    seen = []
    tracking = Tracking([hanging], report=seen.append, finish_timeout=0.5)
    tracking.start()
    t0 = time.monotonic()
    for step in range(1, 50):
        tracking.on_metrics(step, {"train/loss": 1.0})  # the loop never waits on the tracker
    assert time.monotonic() - t0 < 0.1
    tracking.on_finish(True, "s3://b/model")
    assert time.monotonic() - t0 < 2
    assert seen[-1].problem == "hanging: did not finish within 0.5s; the rest of its updates were not sent"
    hanging.release.set()


def test_a_failed_backend_is_dropped_after_one_failure_and_named_in_the_summary():
    recording = _Recording()
    seen = []
    tracking = Tracking([recording], report=seen.append, finish_timeout=5)
    tracking.start()
    tracking.on_params({"a": 1})
    tracking.on_finish(True)
    assert recording.calls == []  # nothing after the failed start
    assert seen[-1].problem == "recording: start failed: ConnectionError: refused"


def test_scalar_names_are_shared_by_both_trackers():
    assert train_scalars({"loss": 2.0, "grad_norm": None, "tokens": 30, "samples": 3, "seconds": 2.0, "padding": 0.25}, lr=1e-3, epoch=0.5) == {
        "train/loss": 2.0, "train/learning_rate": 1e-3, "train/epoch": 0.5, "train/padding_fraction": 0.25,
        "train/tokens_per_second": 15.0, "train/samples_per_second": 1.5}
    assert eval_scalars({"eval_loss": 1.5, "accuracy": 0.75, "confusion": [[1]], "n": float("nan")}) == {"eval/loss": 1.5, "eval/accuracy": 0.75}
    assert eval_scalars({"eval_loss": 1.0}, "test") == {"test/loss": 1.0}


def test_params_are_flat_scalars():
    from finetune_api.spec import parse_spec

    spec = parse_spec({"model": {"uri": "s3://models/m"}, "dataset": {"train": "s3://data/t.jsonl"}, "output": {"uri": "s3://out/r"},
                       "hyperparameters": {"learningRate": 0.002}})
    params = flat_params(spec, job="j")
    assert params["hyperparameters.learningRate"] == 0.002 and params["lora.r"] == spec.lora_or_default.r and params["job"] == "j"
    assert all(isinstance(v, (str, int, float, bool)) for v in params.values())


def test_a_later_attempt_continues_the_jobs_mlflow_run(mlflow_server):
    """Two attempts of one job (same uid): one run, the metric history continued, the first params kept."""
    from mlflow.tracking import MlflowClient

    from finetune_trainer.tracking import MlflowBackend

    def attempt(world_size, steps):
        backend = MlflowBackend(mlflow_server.url, experiment="unit-attempts", job="j", run_key="uid-attempts",
                                output_uri="s3://b/out", register_model=None)
        tracking = Tracking([backend], finish_timeout=30)
        tracking.start()
        tracking.on_params({"world_size": world_size, "method": "lora"})
        for step in steps:
            tracking.on_metrics(step, {"train/loss": 1.0 / step})
        tracking.on_finish(None if steps[-1] < 4 else True)
        assert tracking.problems == {}
        return backend.run_id

    first, second = attempt(2, [1, 2]), attempt(4, [3, 4])
    assert first == second
    client = MlflowClient(tracking_uri=mlflow_server.url)
    run = client.get_run(first)
    assert run.info.status == "FINISHED" and run.data.params == {"world_size": "2", "method": "lora"}
    assert [(m.step, m.value) for m in client.get_metric_history(first, "train/loss")] == [(s, 1.0 / s) for s in (1, 2, 3, 4)]


def test_a_refused_registration_is_reported_and_the_run_still_ends(mlflow_server):
    """MLflow servers refuse a model version whose source is a local path outside the run's artifacts (an
    output.uri that is not s3://): the run still ends FINISHED and the problem names the registration."""
    from mlflow.tracking import MlflowClient

    from finetune_trainer.tracking import MlflowBackend

    backend = MlflowBackend(mlflow_server.url, experiment="unit-refused", job="j", run_key="uid-refused",
                            output_uri="/data/out", register_model="refused-model")
    seen = []
    tracking = Tracking([backend], report=seen.append, finish_timeout=30)
    tracking.start()
    tracking.on_finish(True, "/data/out/model")
    assert seen[-1].problem.startswith("mlflow: finish failed: RestException: INVALID_PARAMETER_VALUE: Invalid model version source")
    assert MlflowClient(tracking_uri=mlflow_server.url).get_run(backend.run_id).info.status == "FINISHED"
    assert seen[-1].mlflow_model_version is None


def _trial(mlflow_server, experiment, sweep, number, backend_class=None, **kw):
    from finetune_trainer.tracking import MlflowBackend, SweepTrial

    cls = backend_class or MlflowBackend
    return cls(mlflow_server.url, experiment=experiment, job=f"{sweep}-t{number}", run_key=f"uid-{experiment}-{sweep}-t{number}",
               output_uri=f"s3://b/{sweep}-t{number}", register_model=None,
               sweep=SweepTrial(sweep, f"uid-{experiment}-{sweep}", number), **kw)


def _run_trial(backend, value, started=None):
    tracking = Tracking([backend], finish_timeout=60)
    tracking.start()
    tracking.on_metrics(1, {"train/loss": value})
    if started is not None:
        started.wait(60)
    tracking.on_result("eval_loss", value)
    tracking.on_finish(True)
    assert tracking.problems == {}
    return backend


def _parents(client, experiment_id, sweep_uid, view):
    import hashlib

    key = hashlib.sha256(sweep_uid.encode()).hexdigest()[:32]
    return client.search_runs([experiment_id], filter_string=f"tags.`finetune.sweepKey` = '{key}'", run_view_type=view)


def test_parallel_trials_of_a_sweep_converge_on_one_parent_run(mlflow_server):
    """Two trials that both find no parent run and both create one (forced here: each waits for the other after
    its first search): the later one deletes its own, both runs end under the earlier, which holds each trial's result."""
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    from finetune_trainer.tracking import MlflowBackend

    race = threading.Barrier(2)

    class Racing(MlflowBackend):
        raced = False

        def _sweep_parents(self):
            found = super()._sweep_parents()
            if not self.raced:
                self.raced = True
                race.wait(30)  # both have looked before either creates
            return found

    backends = [_trial(mlflow_server, "unit-sweep", "sw", n, Racing) for n in (0, 1)]
    threads = [threading.Thread(target=_run_trial, args=(b, 0.5 + n)) for n, b in enumerate(backends)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    client = MlflowClient(tracking_uri=mlflow_server.url)
    experiment_id = client.get_experiment_by_name("unit-sweep").experiment_id
    (parent,) = _parents(client, experiment_id, "uid-unit-sweep-sw", ViewType.ACTIVE_ONLY)
    (loser,) = _parents(client, experiment_id, "uid-unit-sweep-sw", ViewType.DELETED_ONLY)  # the race did happen
    assert {b.created_parent for b in backends} == {parent.info.run_id, None}
    assert (parent.info.run_name, parent.data.tags["finetune.sweep"], parent.info.status) == ("sw", "sw", "FINISHED")
    assert "mlflow.parentRunId" not in parent.data.tags
    for n, backend in enumerate(backends):
        run = client.get_run(backend.run_id)
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id != loser.info.run_id
        assert (run.info.run_name, run.data.tags["finetune.sweepTrial"], run.info.status) == (f"sw-t{n}", str(n), "FINISHED")
    assert sorted((m.step, m.value) for m in client.get_metric_history(parent.info.run_id, "trial/eval_loss")) == [(0, 0.5), (1, 1.5)]  # two threads: the history comes in timestamp order
    children = client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(r.info.run_name for r in children) == ["sw-t0", "sw-t1"]

    # another sweep in the same experiment: its own parent; a later trial of the first sweep: the existing parent
    other = _run_trial(_trial(mlflow_server, "unit-sweep", "sw2", 0), 0.25)
    (other_parent,) = _parents(client, experiment_id, "uid-unit-sweep-sw2", ViewType.ACTIVE_ONLY)
    assert other.parent_run_id == other_parent.info.run_id != parent.info.run_id and other_parent.info.run_name == "sw2"
    third = _run_trial(_trial(mlflow_server, "unit-sweep", "sw", 2), 0.75)
    assert third.parent_run_id == parent.info.run_id and third.created_parent is None
    assert sorted(m.step for m in client.get_metric_history(parent.info.run_id, "trial/eval_loss")) == [0, 1, 2]


def test_a_trial_re_points_its_run_at_finish_when_an_earlier_parent_appeared(mlflow_server):
    """Pods' clocks differ: a trial can create its parent, see no other, and later find one that started earlier.
    At finish it re-points its run's mlflow.parentRunId at that one and deletes its own; the parent goes RUNNING while
    a trial starts and FINISHED when it ends."""
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    started, go_on = threading.Event(), threading.Event()
    backend = _trial(mlflow_server, "unit-sweep-skew", "sk", 1)
    thread = threading.Thread(target=_run_trial, args=(backend, 0.4, go_on))
    started_at = time.time()
    thread.start()
    client = MlflowClient(tracking_uri=mlflow_server.url)
    deadline = time.monotonic() + 60
    while backend.run_id is None and time.monotonic() < deadline:
        time.sleep(0.05)
    own = backend.created_parent
    assert own and backend.parent_run_id == own and client.get_run(own).info.status == "RUNNING"
    experiment_id = client.get_experiment_by_name("unit-sweep-skew").experiment_id
    (key,) = {r.data.tags["finetune.sweepKey"] for r in _parents(client, experiment_id, "uid-unit-sweep-skew-sk", ViewType.ACTIVE_ONLY)}
    earlier = client.create_run(experiment_id, tags={"finetune.sweepKey": key, "finetune.sweep": "sk"}, run_name="sk",
                                start_time=int(started_at * 1000) - 60_000).info.run_id
    go_on.set()
    thread.join(120)
    assert client.get_run(backend.run_id).data.tags["mlflow.parentRunId"] == earlier == backend.parent_run_id
    assert client.get_run(own).info.lifecycle_stage == "deleted"
    parent = client.get_run(earlier)
    assert parent.info.status == "FINISHED" and parent.data.metrics == {"trial/eval_loss": 0.4}


def test_an_explicit_parent_run_wins_over_the_sweep_and_the_sweep_comes_from_the_operators_env():
    from finetune_api import env
    from finetune_trainer.tracking import MlflowBackend, SweepTrial

    sweep = SweepTrial.from_env({env.SWEEP_NAME: "sw", env.SWEEP_UID: "u", env.SWEEP_TRIAL: "7"})
    assert sweep == SweepTrial("sw", "u", 7) and len(sweep.key) == 32
    assert SweepTrial.from_env({env.SWEEP_NAME: "sw", env.SWEEP_TRIAL: "7"}) is None and SweepTrial.from_env({}) is None
    backend = MlflowBackend("http://x", experiment="e", job="j", run_key="k", output_uri="o", register_model=None,
                            parent_run_id="p-1", sweep=sweep)
    assert backend.sweep is None and backend.parent_run_id == "p-1"
