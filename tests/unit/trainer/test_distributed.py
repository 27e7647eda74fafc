"""Once-per-node work: local rank 0 works, the other local ranks wait for it and share its result or its failure."""

from __future__ import annotations

import threading

import pytest

from finetune_trainer.distributed import DistInfo, local_main_works
from finetune_trainer.errors import MalformedData, ModelNotFound, TrainerError


def _ranks(n: int) -> list[DistInfo]:
    return [DistInfo(rank=r, local_rank=r, world_size=n, local_world_size=n) for r in range(n)]


def _run_all(target, dists):
    """Run ``target(dist)`` for every rank in threads, waiters first; rank -> result or exception."""
    results: dict[int, object] = {}

    def one(dist):
        try:
            results[dist.local_rank] = target(dist)
        except BaseException as e:  # noqa: BLE001 - the test looks at it
            results[dist.local_rank] = e

    threads = [threading.Thread(target=one, args=(d,), daemon=True) for d in reversed(dists)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert not any(t.is_alive() for t in threads), "a waiting rank hung"
    return results


def test_the_waiters_get_local_rank_zeros_result(tmp_path):
    calls = []

    def target(dist):
        return local_main_works(dist, lambda: calls.append(1) or "made", lambda: "read", done=tmp_path / "done",
                                failed=tmp_path / "failed", what="work", timeout_s=10, poll_s=0.05)

    assert _run_all(target, _ranks(3)) == {0: "made", 1: "read", 2: "read"} and calls == [1]


@pytest.mark.parametrize(("raised", "expected"), [(MalformedData("row 3 is not JSON"), MalformedData),
                                                  (RuntimeError("disk on fire"), TrainerError)])
def test_a_failure_on_local_rank_zero_fails_every_local_rank_with_its_reason(tmp_path, raised, expected):
    def work():
        raise raised

    def target(dist):
        return local_main_works(dist, work, lambda: "read", done=tmp_path / "done", failed=tmp_path / "failed",
                                what="prepare the data", timeout_s=3600, poll_s=0.05)

    results = _run_all(target, _ranks(3))
    assert results[0] is raised
    for rank in (1, 2):
        assert type(results[rank]) is expected
        assert str(raised) in results[rank].message


def test_model_download_failure_reaches_the_waiting_ranks_at_once(tmp_path):
    """Before: local ranks 1..n polled for the download marker for 6 hours after local rank 0 had failed."""
    from finetune_trainer.model import resolve_model_dir

    class EmptyStore:
        def list(self, prefix):
            return []

    results = _run_all(lambda d: resolve_model_dir("s3://models/none", EmptyStore(), d, cache_dir=tmp_path), _ranks(2))
    assert all(isinstance(r, ModelNotFound) and "holds no config.json" in r.message for r in results.values())


def test_a_waiter_gives_up_after_the_timeout(tmp_path):
    with pytest.raises(ModelNotFound, match="timed out waiting for local rank 0 to download x"):
        local_main_works(_ranks(2)[1], lambda: None, lambda: None, done=tmp_path / "done", failed=tmp_path / "failed",
                         what="download x", timeout_s=0.1, timeout_error=ModelNotFound, poll_s=0.02)


def test_data_is_prepared_once_per_node_through_the_same_helper(tmp_path, monkeypatch):
    """data/shared.py uses local_main_works: rank 0 prepares, the waiters load its manifest or share its failure."""
    from finetune_trainer.data import shared
    from finetune_trainer.data.prepare import PreparedData

    prepared = []

    def prepare(spec, storage, tokenizer, *, cache_dir):
        prepared.append(cache_dir)
        return PreparedData(train=None, validation=None, test=None, retention=None, labels=["a", "b"], class_weights=None, report={"rows": 2})

    monkeypatch.setattr(shared, "prepare_data", prepare)

    def target(dist):
        return shared.prepare_data_per_node(None, None, None, root=tmp_path, local_rank=dist.local_rank,
                                            local_world_size=dist.local_world_size, poll_seconds=0.05)

    results = _run_all(target, _ranks(3))
    assert len(prepared) == 1, "only local rank 0 prepares"
    assert all(r.labels == ["a", "b"] and r.report == {"rows": 2} for r in results.values())

    def broken(spec, storage, tokenizer, *, cache_dir):
        raise MalformedData("train.jsonl line 7 is not JSON")

    monkeypatch.setattr(shared, "prepare_data", broken)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # the next launch: a fresh folder
    results = _run_all(target, _ranks(3))
    assert all(type(r) is MalformedData and "line 7" in r.message for r in results.values())
