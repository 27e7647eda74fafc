"""The Prometheus endpoint of a running trainer, scraped over HTTP."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from finetune_trainer.metrics import TrainerMetrics
from helpers_assets import RUNNER, assets, lm_spec, trainer_env, write_config  # noqa: F401


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


@pytest.mark.slow
def test_running_trainer_serves_real_values(assets, tmp_path):
    port = _free_port()
    spec = lm_spec(assets, str(tmp_path / "out"), hyperparameters={"maxSteps": 12})
    config = write_config(tmp_path / "job.yaml", spec, name="metrics-job")
    proc = subprocess.Popen([sys.executable, str(RUNNER), "--config", str(config)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True,
                            env=trainer_env(tmp_path, FINETUNE_METRICS_PORT=str(port), FT_TEST_STEP_SLEEP="0.25"))
    try:
        deadline = time.monotonic() + 120
        samples: dict = {}
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read()[-3000:]
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
        assert _get(samples, "finetune_checkpoint_step") == 3
        assert _get(samples, "finetune_checkpoint_save_bytes") > 10_000
        assert _get(samples, "finetune_checkpoint_save_seconds") > 0
        assert _get(samples, "finetune_data_rows", kind="rows_read") == 160
        assert _get(samples, "finetune_stage", stage="training") == 1
        assert _get(samples, "finetune_stage", stage="baseline") == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_port_zero_serves_nothing_and_names_are_prefixed():
    m = TrainerMetrics("j", 0, port=0)
    assert m.port is None
    m.on_step(step=1, epoch=0.1, loss=2.0, lr=1e-3, grad_norm=1.0, tokens=10, samples=2, seconds=0.5, padding=0.25)
    names = {metric.name for metric in m.registry.collect()}
    assert names and all(n.startswith("finetune_") for n in names)
    assert m.registry.get_sample_value("finetune_tokens_per_second", {"job": "j", "rank": "0"}) == 20.0
