"""The Prometheus endpoint of a running trainer, scraped over HTTP."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from finetune_trainer.metrics import TrainerMetrics
from helpers_assets import RUNNER, assets, free_port, lm_spec, trainer_env, write_config  # noqa: F401


def _scrape(port: int) -> dict[tuple[str, frozenset], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def _get(samples, name, **labels):
    want = {"job": "metrics-job", "rank": "0", **labels}
    return samples.get((name, frozenset(want.items())))


def _progress(out) -> dict:
    try:
        return json.loads((out / "progress.json").read_text())
    except (OSError, ValueError):  # not written yet (writes are atomic, so never half a file)
        return {}


@pytest.mark.slow
def test_running_trainer_serves_real_values(assets, tmp_path):
    """Scraped while it trains, then the same run left to finish for its final progress document."""
    port = free_port()
    out = tmp_path / "out"
    spec = lm_spec(assets, str(out), hyperparameters={"maxSteps": 12})
    config = write_config(tmp_path / "job.yaml", spec, name="metrics-job")
    log_path = tmp_path / "trainer.log"  # a file, not a pipe: a run left to finish must never block on a full pipe
    log_file = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, str(RUNNER), "--config", str(config)], stdout=subprocess.DEVNULL,
                            stderr=log_file, text=True,
                            env=trainer_env(tmp_path, FINETUNE_METRICS_PORT=str(port), FT_TEST_STEP_SLEEP="0.25"))

    def tail() -> str:
        return log_path.read_text()[-3000:]

    try:
        deadline = time.monotonic() + 120
        samples: dict = {}
        while time.monotonic() < deadline:
            assert proc.poll() is None, tail()
            try:
                samples = _scrape(port)
            except OSError:
                samples = {}
            if (_get(samples, "finetune_step") or 0) >= 5 and _get(samples, "finetune_checkpoint_step"):
                break
            time.sleep(0.1)
        step = _get(samples, "finetune_step")
        assert step is not None and 5 <= step < 12
        assert _get(samples, "finetune_total_steps") == 12
        assert 2.0 < _get(samples, "finetune_train_loss") < 5.0
        assert 0 < _get(samples, "finetune_learning_rate") <= 0.01
        assert _get(samples, "finetune_grad_norm") > 0
        assert _get(samples, "finetune_tokens_per_second") > 0 and _get(samples, "finetune_samples_per_second") > 0
        assert _get(samples, "finetune_tokens_total") > 100
        assert _get(samples, "finetune_padding_fraction") == 0.0  # packing: no pad tokens computed
        assert _get(samples, "finetune_eval", metric="eval_loss") > 0  # evaluated at step 4
        # Every 3 steps, plus the best evaluation's when it is new (evaluation.useBestModel, on by default): 3 or 4 here.
        assert 3 <= _get(samples, "finetune_checkpoint_step") <= step
        assert _get(samples, "finetune_checkpoint_save_bytes") > 10_000
        assert _get(samples, "finetune_checkpoint_save_seconds") > 0
        assert _get(samples, "finetune_data_rows", kind="rows_read") == 160
        assert _get(samples, "finetune_stage", stage="training") == 1
        assert _get(samples, "finetune_stage", stage="baseline") == 0
        # The epoch gauge is fractional and moves from the first step; the memory gauge is the process's
        # (peak) resident memory, the one that matters on CPU -- torch alone is well over 100 MiB.
        assert 0 < _get(samples, "finetune_epoch") < 1
        assert _get(samples, "finetune_process_resident_memory_bytes") > 100 * 2**20

        # progress.json while training: rewritten at the latest checkpoint/evaluation, with an ETA.
        running: dict = {}
        while time.monotonic() < deadline and not (running.get("stage") == "training" and running.get("step", 0) >= 3):
            running = _progress(out)
            time.sleep(0.05)
        assert running.get("stage") == "training" and 3 <= running["step"] < 12, running
        assert running["totalSteps"] == 12 and running["etaSeconds"] > 0
        assert running["epoch"] > 0 and math.isfinite(running["trainLoss"])

        # The same run to the end: the final document.
        assert proc.wait(timeout=180) == 0, tail()
        final = _progress(out)
        assert final["stage"] == "done" and final["step"] == final["totalSteps"] == 12
        # 12 steps x 2 accumulated micro-batches of the epoch's 32 (128 train rows / batch 4).
        assert final["epoch"] == pytest.approx(24 / 32)
        assert math.isfinite(final["trainLoss"]) and 0 < final["trainLoss"] < 5
        assert final.get("etaSeconds") in (0, None)  # nothing left to do
        assert final["bestMetricName"] == "eval_loss" and math.isfinite(final["bestMetric"]) and final["bestMetric"] > 0
        assert final["latestCheckpoint"] == str(out / "checkpoints" / "step-00000012")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log_file.close()


def test_port_zero_serves_nothing_and_names_are_prefixed():
    m = TrainerMetrics("j", 0, port=0)
    assert m.port is None
    m.on_step(step=1, epoch=0.1, loss=2.0, lr=1e-3, grad_norm=1.0, tokens=10, samples=2, seconds=0.5, padding=0.25)
    names = {metric.name for metric in m.registry.collect()}
    assert names and all(n.startswith("finetune_") for n in names)
    assert m.registry.get_sample_value("finetune_tokens_per_second", {"job": "j", "rank": "0"}) == 20.0
