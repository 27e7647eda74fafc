"""Checkpoint files, manifest-last completeness, pruning and verification, on the real Storage."""

from __future__ import annotations

import json

import pytest
import torch

from finetune_trainer.checkpoint import CheckpointManager, sha256_file
from finetune_trainer.distributed import DistInfo
from finetune_trainer.errors import CheckpointError, InvalidConfig
from finetune_trainer.parallel import ModelState
from finetune_trainer.storage import Storage, join
from helpers_assets import CountingScheduler


def _setup(tmp_path, keep_last=2):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    mgr = CheckpointManager(Storage(), str(tmp_path / "out"), tmp_path / "work", DistInfo(), keep_last=keep_last, is_adapter=False, join=join)
    return model, opt, CountingScheduler(), mgr


def _ms(model, opt):
    return ModelState("single", model, model, opt, is_main=True)


def _save(mgr, model, opt, sched, step, best=None):
    uri = mgr.save(step, model_state=_ms(model, opt), scheduler=sched, scaler=None, state={"step": step}, best_step=best)
    mgr.wait()
    return uri


def test_manifest_is_written_last_and_covers_every_file(tmp_path):
    model, opt, sched, mgr = _setup(tmp_path)
    uri = _save(mgr, model, opt, sched, 5)
    assert uri == str(tmp_path / "out" / "checkpoints" / "step-00000005")
    manifest = json.loads((tmp_path / "out/checkpoints/step-00000005/manifest.json").read_text())
    assert set(manifest["files"]) == {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state_rank0.pt", "trainer_state.json"}
    for name, meta in manifest["files"].items():
        assert sha256_file(tmp_path / "out/checkpoints/step-00000005" / name) == meta["sha256"]
    assert not (tmp_path / "work" / "checkpoints" / "step-00000005").exists()  # local staging cleaned after upload


def test_round_trip_restores_weights_optimizer_scheduler_and_rng(tmp_path):
    model, opt, sched, mgr = _setup(tmp_path)
    sched.n = 7
    _save(mgr, model, opt, sched, 1)
    expected_next = torch.rand(3)  # what the RNG gives right after the save
    want = {k: v.clone() for k, v in model.state_dict().items()}
    model2, opt2, sched2, _ = _setup(tmp_path / "other")
    with torch.no_grad():
        model2.weight.zero_()
    state = mgr.load(mgr.uri_for(1), model_state=_ms(model2, opt2), scheduler=sched2, scaler=None)
    assert state == {"step": 1, "world_size": 1} and sched2.n == 7
    assert all(torch.equal(model2.state_dict()[k], want[k]) for k in want)
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert torch.equal(torch.rand(3), expected_next)


def test_prune_keeps_last_n_plus_best_and_incomplete_are_ignored_then_removed(tmp_path):
    model, opt, sched, mgr = _setup(tmp_path, keep_last=2)
    for step in (1, 2, 3, 4):
        _save(mgr, model, opt, sched, step, best=2)
    root = tmp_path / "out" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002", "step-00000003", "step-00000004"]
    # An upload killed before its manifest: newest on disk, but not complete.
    (root / "step-00000009").mkdir()
    (root / "step-00000009" / "model.safetensors").write_bytes(b"half")
    assert [c.step for c in mgr.complete()] == [2, 3, 4]
    assert mgr.find_resume("latest") == mgr.uri_for(4)
    assert mgr.cleanup_incomplete() == [9] and not (root / "step-00000009").exists()
    with pytest.raises(InvalidConfig, match="no manifest.json"):
        mgr.find_resume(str(root / "step-00000009"))
    assert mgr.find_resume("none") is None


def test_a_file_that_does_not_match_its_manifest_is_refused(tmp_path):
    model, opt, sched, mgr = _setup(tmp_path)
    _save(mgr, model, opt, sched, 3)
    path = tmp_path / "out/checkpoints/step-00000003/optimizer.pt"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match its manifest"):
        mgr.load(mgr.uri_for(3), model_state=_ms(model, opt), scheduler=sched, scaler=None)


def test_upload_failure_surfaces_as_checkpoint_error(tmp_path, monkeypatch):
    model, opt, sched, mgr = _setup(tmp_path)

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(mgr.storage, "upload_file", broken)
    mgr.save(1, model_state=_ms(model, opt), scheduler=sched, scaler=None, state={}, best_step=None)
    with pytest.raises(CheckpointError, match="disk full"):
        mgr.wait()
    assert not (tmp_path / "out/checkpoints/step-00000001/manifest.json").exists()


# ------------------------------------------------------------------------------------ S3 end to end


@pytest.mark.slow
def test_s3_model_data_and_output_through_moto(tmp_path, monkeypatch):
    """Base model, data and every output on an S3 endpoint (moto server); a second run resumes from S3."""
    import socket
    from pathlib import Path

    import boto3
    from moto.server import ThreadedMotoServer

    from helpers_assets import build_tiny_llama, lm_rows, lm_spec, run_trainer, write_config, write_jsonl

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        creds = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing")
        for bucket in ("models", "data", "results"):
            s3.create_bucket(Bucket=bucket)
        llama = build_tiny_llama(tmp_path / "llama")
        for f in Path(llama).iterdir():
            s3.upload_file(str(f), "models", f"tiny/{f.name}")
        s3.upload_file(write_jsonl(tmp_path / "lm.jsonl", lm_rows(80)), "data", "lm/train.jsonl")

        assets = {"llama": "s3://models/tiny", "lm_data": "s3://data/lm/train.jsonl"}
        spec = lm_spec(assets, "s3://results/job", hyperparameters={"maxSteps": 4}, checkpoint={"everySteps": 2, "keepLast": 1},
                       storage={"endpoint": endpoint, "region": "us-east-1"})
        config = write_config(tmp_path / "job.yaml", spec)
        r = run_trainer(config, tmp_path, **creds)
        assert r.returncode == 0, r.stderr[-3000:]
        keys = {o["Key"] for o in s3.list_objects_v2(Bucket="results", Prefix="job/")["Contents"]}
        assert "job/checkpoints/step-00000004/manifest.json" in keys
        assert not any(k.startswith("job/checkpoints/step-00000002/") for k in keys)  # pruned (keepLast 1)
        assert {"job/progress.json", "job/data-report.json", "job/model/adapter_model.safetensors", "job/model/model_card.json"} <= keys
        progress = json.loads(s3.get_object(Bucket="results", Key="job/progress.json")["Body"].read())
        assert progress["stage"] == "done" and progress["latestCheckpoint"] == "s3://results/job/checkpoints/step-00000004"
        assert progress["modelUri"] == "s3://results/job/model"
        assert list((tmp_path / "cache" / "models").glob("*/config.json"))  # downloaded once to the node cache

        r = run_trainer(config, tmp_path, **creds)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "resumed from s3://results/job/checkpoints/step-00000004 at step 4" in r.stderr

        from finetune_trainer.distributed import DistInfo
        from finetune_trainer.errors import ModelNotFound
        from finetune_trainer.model import resolve_model_dir
        from finetune_trainer.storage import Storage

        for key, value in creds.items():
            monkeypatch.setenv(key, value)
        storage = Storage(endpoint_url=endpoint, region="us-east-1")
        for missing in ("s3://models/nothing-here", "s3://no-such-bucket/tiny"):
            with pytest.raises(ModelNotFound, match="holds no config.json"):
                resolve_model_dir(missing, storage, DistInfo(), cache_dir=tmp_path / "cache2")
        assert "training already finished at step 4" in r.stderr
    finally:
        server.stop()


def test_optimizer_state_is_stored_by_parameter_name_and_old_index_keyed_files_still_load(tmp_path):
    model, opt, sched, mgr = _setup(tmp_path)
    _save(mgr, model, opt, sched, 2)
    stored = torch.load(tmp_path / "out/checkpoints/step-00000002/optimizer.pt", weights_only=True)
    assert set(stored["state"]) == {"weight", "bias"}  # the layout torch.distributed.checkpoint (FSDP) uses
    assert stored["param_groups"][0]["params"] == ["weight", "bias"]
    model2, opt2, sched2, _ = _setup(tmp_path / "other")
    ms = _ms(model2, opt2)
    ms.restore_optimizer(opt.state_dict())  # a checkpoint written before the switch (keyed by index)
    assert torch.equal(opt2.state_dict()["state"][1]["exp_avg"], opt.state_dict()["state"][1]["exp_avg"])
    with pytest.raises(CheckpointError, match="optimizer state does not match"):
        ms.restore_optimizer({"state": {}, "param_groups": [{**stored["param_groups"][0], "params": ["weight", "other"]}]})


def test_s3_model_is_downloaded_once_per_node_while_the_other_local_ranks_wait(tmp_path):
    """Local rank 0 downloads to the node cache; local ranks 1..n wait for its marker and use the same folder."""
    import threading
    import time as _time

    from finetune_trainer import model as model_mod
    from finetune_trainer.distributed import DistInfo

    class SlowStore:  # lists a model folder and "downloads" it slowly; counts downloads
        downloads = 0

        def list(self, prefix):
            return [prefix + "config.json", prefix + "model.safetensors"]

        def download_prefix(self, prefix, local, workers=8):
            SlowStore.downloads += 1
            _time.sleep(1.0)
            (Path(local) / "config.json").write_text("{}")

    from pathlib import Path

    results: dict[int, str] = {}

    def rank(local_rank):
        dist = DistInfo(rank=local_rank, local_rank=local_rank, world_size=3, local_world_size=3)
        results[local_rank] = model_mod.resolve_model_dir("s3://models/tiny", SlowStore(), dist, cache_dir=tmp_path / "cache")

    threads = [threading.Thread(target=rank, args=(r,)) for r in (1, 2, 0)]  # the waiters start first
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert SlowStore.downloads == 1
    assert len(set(results.values())) == 1 and len(results) == 3
    assert (Path(results[0]) / "config.json").exists() and (Path(results[0]) / ".complete").exists()
