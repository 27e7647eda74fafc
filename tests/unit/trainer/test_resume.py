"""Exact resume: a run killed with SIGKILL (or stopped with SIGTERM) and resumed produces the same
per-step losses as one that was never interrupted. The runs use LoRA dropout and attention dropout,
so this also checks that every RNG stream comes back, not just weights and optimizer state."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from helpers_assets import RUNNER, assets, checkpoint_state, lm_spec, run_trainer, trainer_env, write_config  # noqa: F401

pytestmark = pytest.mark.slow

STEPS = 16


def _spec(assets, out):
    return lm_spec(assets, str(out), hyperparameters={"maxSteps": STEPS}, checkpoint={"everySteps": 4, "keepLast": 5},
                   evaluation={"everySteps": 4})


def _losses(state):
    return [(h["step"], h["loss"]) for h in state["history"]]


@pytest.fixture(scope="module")
def reference(assets, tmp_path_factory):
    """An uninterrupted run: the loss history every resumed run must reproduce."""
    tmp = tmp_path_factory.mktemp("reference")
    out = tmp / "out"
    r = run_trainer(write_config(tmp / "job.yaml", _spec(assets, out)), tmp)
    assert r.returncode == 0, r.stderr[-3000:]
    state = checkpoint_state(out, STEPS)
    assert [s for s, _ in _losses(state)] == list(range(1, STEPS + 1))
    return SimpleNamespace(losses=_losses(state), out=out)


def _start(config: Path, tmp: Path, sleep: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(RUNNER), "--config", str(config)], env=trainer_env(tmp, FT_TEST_STEP_SLEEP=str(sleep)),
                            stdout=subprocess.DEVNULL, stderr=open(tmp / "first.log", "w"))


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"trainer exited early with {proc.returncode}"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def _resumed_step(stderr: str) -> int:
    line = next(x for x in stderr.splitlines() if "resumed from" in x)
    return int(line.split(" at step ")[1].split()[0])


def test_kill9_then_resume_reproduces_the_losses(assets, reference, tmp_path):
    out = tmp_path / "out"
    config = write_config(tmp_path / "job.yaml", _spec(assets, out))
    proc = _start(config, tmp_path, sleep=0.3)
    _wait_for(out / "checkpoints" / "step-00000004" / "manifest.json", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    # An interrupted upload newer than every complete checkpoint: no manifest, garbage weights.
    partial = out / "checkpoints" / "step-00000010"
    partial.mkdir(parents=True)
    (partial / "adapter_model.safetensors").write_bytes(b"not a checkpoint")

    r = run_trainer(config, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    resumed = _resumed_step(r.stderr)
    assert 4 <= resumed < STEPS
    assert "step-00000010" not in r.stderr.split("resumed from")[1].splitlines()[0]
    assert "removing incomplete checkpoint" in r.stderr
    # After the resume, steps resumed+1.. were computed again by the second process, and match exactly.
    assert _losses(checkpoint_state(out, STEPS)) == reference.losses
    steps_logged = [int(x.split("step ")[1].split("/")[0]) for x in r.stderr.splitlines() if "] INFO finetune_trainer.train: step " in x]
    assert steps_logged[0] == resumed + 1


def test_sigterm_checkpoints_exits_143_and_resumes_exactly(assets, reference, tmp_path):
    out = tmp_path / "out"
    config = write_config(tmp_path / "job.yaml", _spec(assets, out))
    proc = _start(config, tmp_path, sleep=0.3)
    _wait_for(out / "checkpoints" / "step-00000004" / "manifest.json", proc)
    time.sleep(0.35)  # into step 5 or 6: not a periodic checkpoint step
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    progress = json.loads((out / "progress.json").read_text())
    assert progress["stage"] == "preempted"
    stopped = progress["step"]
    assert 4 < stopped < STEPS and stopped % 4 != 0
    manifest = json.loads((out / "checkpoints" / f"step-{stopped:08d}" / "manifest.json").read_text())
    assert manifest["step"] == stopped and "adapter_model.safetensors" in manifest["files"]
    assert progress["latestCheckpoint"].endswith(f"step-{stopped:08d}")

    r = run_trainer(config, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _resumed_step(r.stderr) == stopped
    assert _losses(checkpoint_state(out, STEPS)) == reference.losses


def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(assets, reference, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(reference.out, out)
    shutil.rmtree(out / "model")
    newest = out / "checkpoints" / f"step-{STEPS:08d}" / "adapter_model.safetensors"
    newest.write_bytes(newest.read_bytes()[:-8] + b"garbage!")  # same size, wrong sha256
    r = run_trainer(write_config(tmp_path / "job.yaml", _spec(assets, out)), tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"skipping checkpoint {out}/checkpoints/step-{STEPS:08d}" in r.stderr and "does not match its manifest" in r.stderr
    assert _resumed_step(r.stderr) == STEPS - 4
    assert _losses(checkpoint_state(out, STEPS)) == reference.losses  # steps 13-16 recomputed from step 12
