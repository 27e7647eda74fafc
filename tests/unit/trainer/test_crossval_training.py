"""dataset.crossValidation through the trainer on the pretrained MiniLM (sentiment classification): three
folds trained one after another with real validation metrics, their mean/std, the refit tested on the test
split, the model card's section; and a run killed in the middle of fold 2 that resumes there, exactly."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from helpers_assets import RUNNER, assets, run_trainer, trainer_env, write_config  # noqa: F401
from test_resume import _wait_for

pytestmark = pytest.mark.slow

STEPS = 8


def _spec(assets, out):
    return {
        "model": {"uri": assets["minilm"], "task": "sequence-classification"},
        "method": "lora",
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1},
        "dataset": {"train": assets["sentiment"], "format": "classification", "split": {"test": 0.2, "seed": 5},
                    "crossValidation": {"folds": 3}, "leakageCheck": "off", "preprocessing": {"dedupe": {"near": False}, "redactPii": False}},
        "hyperparameters": {"maxSteps": STEPS, "learningRate": 0.003, "batchSize": 16, "maxSeqLength": 32, "warmupRatio": 0.0, "seed": 3},
        "evaluation": {"strategy": "steps", "everySteps": 4, "baseline": False, "calibration": False},
        "checkpoint": {"everySteps": 4, "keepLast": 2},
        "output": {"uri": str(out)},
    }


def _fold_state(out, fold, step=STEPS):
    return json.loads((out / "cross-validation" / f"fold-{fold}" / "checkpoints" / f"step-{step:08d}" / "trainer_state.json").read_text())


@pytest.fixture(scope="module")
def reference(assets, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cv")
    out = tmp / "out"
    r = run_trainer(write_config(tmp / "job.yaml", _spec(assets, out), name="sentiment-cv"), tmp)
    assert r.returncode == 0, r.stderr[-3000:]
    return SimpleNamespace(out=out, progress=json.loads((out / "progress.json").read_text()), stderr=r.stderr)


def test_three_folds_report_mean_and_std_and_the_refit_is_tested(reference):
    out, progress = reference.out, reference.progress
    cv = progress["crossValidation"]
    assert cv["folds"] == 3 and cv["stratified"] is True and cv["finalModel"] == "refit" and "currentFold" not in cv
    results = cv["results"]
    assert [r["fold"] for r in results] == [1, 2, 3] and all(r["steps"] == STEPS and r["step"] == STEPS for r in results)
    assert sum(r["validationRows"] for r in results) == 192 and all(r["trainRows"] + r["validationRows"] == 192 for r in results)
    for name in ("accuracy", "eval_loss", "f1_macro"):
        values = [r["metrics"][name] for r in results]
        assert cv["mean"][name] == pytest.approx(np.mean(values), rel=1e-12) and cv["std"][name] == pytest.approx(np.std(values), rel=1e-12)
    assert all(r["metrics"]["accuracy"] >= 0.8 and r["metrics"]["eval_loss"] > 0 for r in results)  # every fold learned the task
    assert len({r["metrics"]["eval_loss"] for r in results}) == 3  # three different validation folds, three different models
    # Each fold validated on its own rows with the metrics its last evaluation logged.
    for r in results:
        state = _fold_state(out, r["fold"])
        assert state["fold"] == r["fold"] and state["evals"][-1]["eval_loss"] == r["metrics"]["eval_loss"]
    # The refit: all 192 non-test rows, no validation, tested on the 48 test rows; the card says what was cross-validated.
    assert progress["evaluation"]["test"]["eval_samples"] == 48 and "final" not in progress["evaluation"]
    assert progress["stage"] == "done" and "fold" not in progress
    refit = json.loads((out / "checkpoints" / f"step-{STEPS:08d}" / "trainer_state.json").read_text())
    assert refit["fold"] is None and refit["folds"] == results
    card = json.loads((out / "model" / "model_card.json").read_text())
    assert card["crossValidation"]["mean"] == cv["mean"] and card["crossValidation"]["results"] == results
    readme = (out / "model" / "README.md").read_text()
    assert "## Cross-validation" in readme and "3-fold stratified cross-validation" in readme
    assert f"| accuracy | {cv['mean']['accuracy']:.4g} | {cv['std']['accuracy']:.4g} |" in readme
    assert json.loads((out / "data-report.json").read_text())["cross_validation"]["rows"] == 192


def test_killed_in_fold_two_resumes_at_that_fold_and_step_exactly(assets, reference, tmp_path):
    out = tmp_path / "out"
    config = write_config(tmp_path / "job.yaml", _spec(assets, out), name="sentiment-cv")
    proc = subprocess.Popen([sys.executable, str(RUNNER), "--config", str(config)], env=trainer_env(tmp_path, FT_TEST_STEP_SLEEP="0.6"),
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "first.log", "w"))
    _wait_for(out / "cross-validation" / "fold-2" / "checkpoints" / "step-00000004" / "manifest.json", proc, timeout=240)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (out / "cross-validation" / "fold-2" / "checkpoints" / f"step-{STEPS:08d}" / "manifest.json").exists()

    r = run_trainer(config, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    resumed = next(x for x in r.stderr.splitlines() if "resumed from" in x)
    assert "/cross-validation/fold-2/checkpoints/step-00000004" in resumed and " at step 4 " in resumed
    assert "cross-validation fold 1/3" not in r.stderr  # fold 1 came back from the checkpoint's state, not retrained
    # The resumed fold continued exactly: the same losses, the same fold metrics, the same mean/std.
    assert _fold_state(out, 2)["history"] == _fold_state(reference.out, 2)["history"]
    cv = json.loads((out / "progress.json").read_text())["crossValidation"]
    assert cv["results"] == reference.progress["crossValidation"]["results"]
    assert cv["mean"] == reference.progress["crossValidation"]["mean"] and cv["std"] == reference.progress["crossValidation"]["std"]
