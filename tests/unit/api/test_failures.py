"""The failure catalogue: the trainer's termination lines parse back to the reason and permanence the
operator acts on, and the trainer's exception classes are exactly the catalogue."""

from __future__ import annotations

import pytest

from finetune_api import failures
from finetune_api.failures import (
    CATALOGUE,
    EXIT_PREEMPTED,
    PERMANENT_EXIT_CODES,
    find_termination_line,
    last_meaningful_line,
    termination_line,
)
from finetune_trainer import errors

TORCHRUN_TAIL = """\
[rank0]: Traceback (most recent call last):
[rank0]:   File "train.py", line 1, in <module>
{line}
E1201 12:00:00.000000 1 torch/distributed/elastic/multiprocessing/api.py] failed (exitcode: 1)
============================================================
finetune_trainer FAILED
------------------------------------------------------------
Failures:
  <NO_OTHER_FAILURES>
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-12-01_12:00:00
  host      : ft-0-0
  rank      : 0 (local_rank: 0)
  exitcode  : {code} (pid: 42)
  error_file: <N/A>
  traceback : To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html
============================================================"""


def test_catalogue_reasons_and_codes_are_unique_and_match_the_readme_table():
    assert len({f.reason for f in CATALOGUE}) == len(CATALOGUE)
    assert len({f.exit_code for f in CATALOGUE} | {failures.GENERIC.exit_code, EXIT_PREEMPTED}) == len(CATALOGUE) + 2
    assert {f.reason: f.exit_code for f in CATALOGUE}["MalformedData"] == 13
    assert sorted(f.reason for f in CATALOGUE if not f.permanent) == ["CheckpointError", "S3EndpointError"]
    assert PERMANENT_EXIT_CODES == {10, 11, 12, 13, 14, 15, 16, 17, 18, 20, 21, 22, 24, 25, 26}
    assert EXIT_PREEMPTED == 143 and EXIT_PREEMPTED not in PERMANENT_EXIT_CODES


def test_trainer_error_classes_are_the_catalogue():
    assert set(errors.ERRORS) == set(failures.BY_REASON)
    for failure in CATALOGUE:
        cls = getattr(errors, failure.reason)
        assert cls is errors.ERRORS[failure.reason]
        assert issubclass(cls, errors.TrainerError)
        assert (cls.reason, cls.exit_code, cls.permanent, cls.__doc__) == (failure.reason, failure.exit_code, failure.permanent, failure.doc)
    assert set(errors.__all__) == {"EXIT_PREEMPTED", "PERMANENT_EXIT_CODES", "TrainerError", *failures.BY_REASON}
    assert errors.EXIT_PREEMPTED is EXIT_PREEMPTED and errors.PERMANENT_EXIT_CODES is PERMANENT_EXIT_CODES


@pytest.mark.parametrize("reason", sorted(failures.BY_REASON))
def test_every_trainer_error_line_parses_back(reason):
    err = errors.ERRORS[reason]("first line\n  second\tline")
    line = err.line()
    assert line == f"{reason}: first line second line"
    for message in (line, f"some log\n{line}\n", TORCHRUN_TAIL.format(line=line, code=err.exit_code)):
        failure, found = find_termination_line(message)
        assert (failure.reason, failure.permanent, failure.exit_code) == (reason, err.permanent, err.exit_code)
        assert found == line


def test_the_last_reason_line_wins_and_unknown_heads_are_not_reasons():
    message = "InvalidConfig: old\nNotAReason: x\nS3EndpointError: could not reach\nTraceback: nope"
    failure, line = find_termination_line(message)
    assert (failure.reason, line) == ("S3EndpointError", "S3EndpointError: could not reach")
    assert find_termination_line("ValueError: boom\nPreempted: SIGTERM") is None
    assert find_termination_line("") is None


def test_termination_line_is_one_line():
    assert termination_line("Preempted", "SIGTERM\n at step 3") == "Preempted: SIGTERM at step 3"
    assert termination_line("X", "") == "X: "


def test_last_meaningful_line_skips_the_torchrun_summary():
    tail = "ValueError: boom\n" + "=" * 60 + "\n  time      : 2026\n  host      : ft-0-0\n  rank      : 0\n  exitcode  : 1\n[0]:\n" + "-" * 60
    assert last_meaningful_line(tail) == "ValueError: boom"
    assert last_meaningful_line("====\n[rank0]: x\n") == "====\n[rank0]: x"  # nothing meaningful: the message itself
