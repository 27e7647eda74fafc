"""Nothing a checkpoint holds is unpickled: a tampered ``.pt`` is refused and its payload never runs.

The attacker here can write the bucket, so they rewrite the manifest too (sizes and sha256 match):
the manifest proves completeness, not authorship, and the refusal must come from the loader itself.
"""

from __future__ import annotations

import io
import json
import random

import numpy as np
import pytest
import torch

from finetune_api.failures import BY_REASON
from finetune_api.spec import parse_spec
from finetune_trainer.checkpoint import CheckpointManager, sha256_file
from finetune_trainer.distributed import DistInfo
from finetune_trainer.errors import CheckpointError
from finetune_trainer.parallel import ModelState
from finetune_trainer.storage import Storage, join
from helpers_assets import CountingScheduler


class Payload:
    """Unpickling this calls ``open(marker, "w")``: the file appearing means the payload ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _setup(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    mgr = CheckpointManager(Storage(), str(tmp_path / "out"), tmp_path / "work", DistInfo(), keep_last=3, is_adapter=False, join=join)
    return model, opt, mgr


def _ms(model, opt):
    return ModelState("single", model, model, opt, is_main=True)


def _save(mgr, model, opt, sched, step):
    uri = mgr.save(step, model_state=_ms(model, opt), scheduler=sched, scaler=None, state={"step": step}, best_step=None)
    mgr.wait()
    return uri


def _replace(folder, name, obj):
    """Overwrite ``name`` in a checkpoint folder with ``obj`` and re-sign the manifest, as an attacker with write access would."""
    path = folder / name
    torch.save(obj, path)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"][name] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_the_payload_is_live_when_unpickled_the_unsafe_way(tmp_path):
    """The control: the same bytes run code under a plain unpickler (what weights_only=False was)."""
    buf = io.BytesIO()
    torch.save({"x": Payload(tmp_path / "ran")}, buf)
    buf.seek(0)
    torch.load(buf, weights_only=False)
    assert (tmp_path / "ran").exists()


@pytest.mark.parametrize("name", ["scheduler.pt", "rng_state_rank0.pt", "optimizer.pt"])
def test_a_pickle_payload_in_a_checkpoint_file_is_refused_and_never_runs(tmp_path, name):
    model, opt, mgr = _setup(tmp_path)
    uri = _save(mgr, model, opt, CountingScheduler(), 3)
    marker = tmp_path / "payload-ran"
    _replace(tmp_path / "out/checkpoints/step-00000003", name, {"n": 1, "evil": Payload(marker)})
    model2, opt2, _ = _setup(tmp_path / "other")
    with torch.no_grad():
        model2.weight.zero_()
    with pytest.raises(CheckpointError) as err:
        mgr.load(uri, model_state=_ms(model2, opt2), scheduler=CountingScheduler(), scaler=None)
    assert not marker.exists()
    assert err.value.reason == "CheckpointError" and not BY_REASON["CheckpointError"].permanent  # resume falls back to an older one
    assert f"{uri}/{name} holds pickled objects other than tensors and plain values" in err.value.message
    assert "builtins.open" in err.value.message or "io.open" in err.value.message  # names what it would have called
    assert "refusing to unpickle it" in err.value.line()
    assert torch.count_nonzero(model2.weight) == 0  # nothing was restored from the refused checkpoint


def test_every_file_of_a_new_checkpoint_needs_no_allow_listed_global(tmp_path):
    model, opt, mgr = _setup(tmp_path)
    _save(mgr, model, opt, CountingScheduler(), 1)
    folder = tmp_path / "out/checkpoints/step-00000001"
    pt_files = sorted(p.name for p in folder.glob("*.pt"))
    assert pt_files == ["optimizer.pt", "rng_state_rank0.pt", "scheduler.pt"]
    for name in pt_files:
        assert torch.serialization.get_unsafe_globals_in_checkpoint(folder / name) == [], name


def test_an_older_trainers_numpy_rng_file_is_read_through_the_safe_path(tmp_path):
    model, opt, mgr = _setup(tmp_path)
    sched = CountingScheduler()
    uri = _save(mgr, model, opt, sched, 2)
    random.seed(5)
    np.random.seed(6)
    torch.manual_seed(7)
    old_format = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    expected = (random.random(), np.random.rand(), torch.rand(2))
    _replace(tmp_path / "out/checkpoints/step-00000002", "rng_state_rank0.pt", old_format)
    other = _ms(*_setup(tmp_path / "o")[:2])
    torch.manual_seed(99)
    mgr.load(uri, model_state=other, scheduler=CountingScheduler(), scaler=None)
    got = (random.random(), np.random.rand(), torch.rand(2))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_an_rng_file_of_the_wrong_shape_is_refused_before_anything_is_restored(tmp_path):
    model, opt, mgr = _setup(tmp_path)
    uri = _save(mgr, model, opt, CountingScheduler(), 4)
    _replace(tmp_path / "out/checkpoints/step-00000004", "rng_state_rank0.pt", {"python": (1, 2), "numpy": {}, "torch": torch.zeros(3)})
    other, sched = _ms(*_setup(tmp_path / "o")[:2]), CountingScheduler()
    torch.manual_seed(11)
    expected = torch.rand(2)
    torch.manual_seed(11)
    with pytest.raises(CheckpointError, match="is not an RNG state this trainer can restore"):
        mgr.load(uri, model_state=other, scheduler=sched, scaler=None)
    assert torch.equal(torch.rand(2), expected)  # the trial put the generators back
    assert sched.n == 0


def test_trust_remote_code_is_off_unless_a_job_asks_for_it():
    spec = parse_spec({"model": {"uri": "s3://models/m"}, "dataset": {"train": "s3://data/t.jsonl"}, "output": {"uri": "s3://out/r"}})
    assert spec.model.trust_remote_code is False


# --------------------------------------------------------------------------- the model folder


def _tiny_model_dir(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    dest = tmp_path / "model"
    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, max_position_embeddings=32)
    LlamaForCausalLM(config).save_pretrained(dest)
    return dest


def _lm_spec(model_dir):
    return parse_spec({"model": {"uri": str(model_dir)}, "method": "full", "dataset": {"train": "/data/t.jsonl"}, "output": {"uri": "/out"}})


def test_pickled_weights_in_a_model_folder_are_refused_and_never_run(tmp_path):
    from finetune_trainer.errors import ModelNotFound
    from finetune_trainer.model import load_model

    model_dir = _tiny_model_dir(tmp_path)
    (model_dir / "model.safetensors").unlink()
    marker = tmp_path / "weights-payload-ran"
    torch.save({"model.embed_tokens.weight": torch.zeros(32, 16), "evil": Payload(marker)}, model_dir / "pytorch_model.bin")
    with pytest.raises(ModelNotFound):
        load_model(str(model_dir), _lm_spec(model_dir))
    assert not marker.exists()


def test_remote_code_in_a_model_folder_is_not_run_unless_trust_remote_code(tmp_path):
    from finetune_trainer.errors import ModelNotFound
    from finetune_trainer.model import load_model

    model_dir = _tiny_model_dir(tmp_path)
    marker = tmp_path / "remote-code-ran"
    (model_dir / "configuration_evil.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nfrom transformers import LlamaConfig\nclass EvilConfig(LlamaConfig):\n    model_type = 'evil'\n")
    config = json.loads((model_dir / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig"}
    config["model_type"] = "evil"  # only the folder's own code knows it
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelNotFound) as err:
        load_model(str(model_dir), _lm_spec(model_dir))
    assert not marker.exists()
    assert "set spec.model.trustRemoteCode: true only if you trust whoever can write it" in err.value.message
