"""SIGTERM before the training loop ends the trainer cleanly.

A pod can be told to stop (suspend, preemption, a group restart, deletion) while it still prepares its
data. There is nothing to checkpoint yet, so the trainer must leave at once (train.SigtermFlag raises
Preempted outside the loop) with the preemption exit code, a one-line reason in the termination
message, no checkpoint, and a progress.json that says so; the next attempt (resume: latest) then finds
no checkpoint and trains from the start.

The runner (helpers_run.py) pauses data preparation deterministically (FT_TEST_PREP_SLEEP, before each
batch of rows is tokenised), so the signal lands in the middle of it, not in a race.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from finetune_trainer.errors import EXIT_PREEMPTED, ModelNotFound
from helpers_assets import RUNNER, assets, checkpoint_state, lm_spec, run_trainer, trainer_env, write_config  # noqa: F401

pytestmark = pytest.mark.slow

STEPS = 6
PAUSE = "120"  # seconds; far longer than the test waits, so the run cannot get past the pause by itself


def _spec(assets, out: Path) -> dict:
    return lm_spec(assets, str(out), hyperparameters={"maxSteps": STEPS},
                   checkpoint={"everySteps": 3, "keepLast": 2, "resume": "latest"}, evaluation={"everySteps": 3})


def _start(config: Path, tmp: Path, log: Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(RUNNER), "--config", str(config)], env=trainer_env(tmp, **env),
                            stdout=subprocess.DEVNULL, stderr=open(log, "w"))


def _wait_until(check, proc: subprocess.Popen, what: str, timeout: float = 180):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert proc.poll() is None, f"trainer exited with {proc.returncode} before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _progress(out: Path) -> dict | None:
    try:
        return json.loads((out / "progress.json").read_text())
    except (OSError, ValueError):  # not written yet
        return None


def _sigterm_when_logged(config: Path, out: Path, tmp: Path, marker: str, **env: str) -> SimpleNamespace:
    """Start the trainer, SIGTERM it once progress.json says preparing-data and the log shows ``marker``."""
    log = tmp / "first.log"
    proc = _start(config, tmp, log, **env)
    try:
        _wait_until(lambda: (_progress(out) or {}).get("stage") == "preparing-data", proc, "stage preparing-data in progress.json")
        _wait_until(lambda: marker in log.read_text(), proc, f"{marker!r} in the log")
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
        seconds = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    termination = tmp / "termination-log"
    return SimpleNamespace(
        code=code, seconds=seconds, log=log.read_text(), progress=_progress(out),
        termination=termination.read_text() if termination.exists() else None,
        files=sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) if out.exists() else [],
    )


@pytest.fixture(scope="module")
def preempted(assets, tmp_path_factory):
    """One run, SIGTERMed while it prepares its data; the tests below look at what it left behind."""
    tmp = tmp_path_factory.mktemp("preempt-early")
    out = tmp / "out"
    config = write_config(tmp / "job.yaml", _spec(assets, out))
    result = _sigterm_when_logged(config, out, tmp, "test: data preparation paused", FT_TEST_PREP_SLEEP=PAUSE)
    return SimpleNamespace(tmp=tmp, out=out, config=config, **vars(result))


def test_exits_at_once_with_the_preemption_code(preempted):
    assert preempted.code == EXIT_PREEMPTED == 143, preempted.log[-3000:]
    assert preempted.seconds < 30  # it left at the signal, not after the pause
    assert "Preempted: SIGTERM before training started" in preempted.log
    assert "Traceback" not in preempted.log
    assert "stage: loading-model" not in preempted.log and "stage: training" not in preempted.log


def test_termination_message_is_a_one_line_reason(preempted):
    message = preempted.termination
    assert message is not None, "no termination message was written"
    assert message.endswith("\n") and message.count("\n") == 1, repr(message)
    assert message.startswith("Preempted: ") and "SIGTERM" in message


def test_nothing_is_checkpointed_or_published(preempted):
    assert not [f for f in preempted.files if f.startswith("checkpoints/") and f.endswith("/manifest.json")]
    assert not [f for f in preempted.files if f.startswith(("checkpoints/", "model/"))]
    assert "data-report.json" not in preempted.files  # preparation never finished
    assert preempted.files == ["progress.json"]


def test_progress_does_not_claim_training_or_failure(preempted):
    progress = preempted.progress
    assert progress is not None
    assert progress["stage"] in ("preparing-data", "preempted")
    assert not progress.get("step") and not progress.get("latestCheckpoint") and not progress.get("checkpoints")
    assert not progress.get("failureReason")  # a preemption is not a failure: the operator restarts the group


def test_progress_says_preempted(preempted):
    """run() marks progress.json when SIGTERM arrives before the loop (the loop marks its own)."""
    assert preempted.progress["stage"] == "preempted"


def test_rerun_with_resume_latest_trains_from_the_start(preempted):
    """The next attempt finds no complete checkpoint and runs normally to the end."""
    (preempted.tmp / "termination-log").unlink(missing_ok=True)
    r = run_trainer(preempted.config, preempted.tmp)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" not in r.stderr and "removing incomplete checkpoint" not in r.stderr
    progress = json.loads((preempted.out / "progress.json").read_text())
    assert progress["stage"] == "done" and progress["step"] == STEPS
    assert [h["step"] for h in checkpoint_state(preempted.out, STEPS)["history"]] == list(range(1, STEPS + 1))
    assert (preempted.out / "model").is_dir() and (preempted.out / "data-report.json").exists()
    assert not (preempted.tmp / "termination-log").exists()  # success leaves no message


def test_sigterm_while_loading_the_tokenizer_is_a_preemption_too(assets, tmp_path):
    """Preempted is a BaseException, so no `except Exception` around library calls turns it into a failure."""
    out = tmp_path / "out"
    config = write_config(tmp_path / "job.yaml", _spec(assets, out))
    result = _sigterm_when_logged(config, out, tmp_path, "test: tokenizer loading paused", FT_TEST_TOKENIZER_SLEEP=PAUSE)
    assert result.code == EXIT_PREEMPTED, f"exit {result.code} (ModelNotFound is {ModelNotFound.exit_code}), message {result.termination!r}"
    assert result.termination.startswith("Preempted: ")
    assert not [f for f in result.files if f.startswith("checkpoints/")]
