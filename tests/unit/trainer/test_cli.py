"""The entry point's contract with the operator: one ``Reason: message`` line in the termination log
and on stderr, and the reason's own exit code."""

from __future__ import annotations

import json

import pytest
import yaml

from finetune_trainer import errors
from finetune_trainer.__main__ import main
from finetune_trainer.config import load_config
from helpers_assets import assets, lm_spec, write_config  # noqa: F401


@pytest.fixture
def termination_log(tmp_path, monkeypatch):
    path = tmp_path / "termination-log"
    monkeypatch.setenv("FINETUNE_TERMINATION_LOG", str(path))
    monkeypatch.setenv("FINETUNE_METRICS_PORT", "0")
    return path


def _minimal(output="/tmp/out") -> dict:
    return {"model": {"uri": "/models/x"}, "dataset": {"train": "/data/train.jsonl"}, "output": {"uri": output}}


def test_bad_config_is_an_invalid_config_one_liner(tmp_path, termination_log, capsys):
    spec = _minimal()
    spec["hyperparameters"] = {"learningRate": -1}
    config = write_config(tmp_path / "job.yaml", spec)
    assert main(["--config", str(config)]) == errors.InvalidConfig.exit_code == 11
    line = termination_log.read_text()
    assert line.count("\n") == 1
    assert line.startswith("InvalidConfig: spec.hyperparameters.learningRate: ")
    assert "greater than 0" in line
    assert line.strip() in capsys.readouterr().err


def test_cross_field_rule_and_unknown_field_name_the_field(tmp_path, termination_log):
    spec = _minimal()
    spec["hyperparameters"] = {"epochs": 1, "maxSteps": 5}
    assert main(["--config", str(write_config(tmp_path / "a.yaml", spec))]) == 11
    assert "set hyperparameters.epochs or hyperparameters.maxSteps, not both" in termination_log.read_text()
    spec = _minimal()
    spec["hyperparameters"] = {"learningRat": 0.1}
    assert main(["--config", str(write_config(tmp_path / "b.yaml", spec))]) == 11
    assert termination_log.read_text().startswith("InvalidConfig: spec.hyperparameters.learningRat: Extra inputs are not permitted")


def test_unreadable_yaml_and_wrong_kind(tmp_path, termination_log):
    bad = tmp_path / "bad.yaml"
    bad.write_text("spec: [unclosed\n")
    assert main(["--config", str(bad)]) == 11
    assert termination_log.read_text().startswith("InvalidConfig: ") and "not valid YAML" in termination_log.read_text()
    doc = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": _minimal()}
    (tmp_path / "pod.yaml").write_text(yaml.safe_dump(doc))
    assert main(["--config", str(tmp_path / "pod.yaml")]) == 11
    assert "kind is 'Pod', expected FineTuneJob" in termination_log.read_text()


def test_manifest_or_bare_spec_and_output_override(tmp_path):
    manifest = load_config(write_config(tmp_path / "m.yaml", _minimal(), name="my-job"))
    assert manifest.name == "my-job" and manifest.spec.output.uri == "/tmp/out"
    bare = load_config(write_config(tmp_path / "bare-job.yaml", _minimal(), manifest=False), output_override="s3://bucket-a/x")
    assert bare.name == "bare-job" and bare.output_uri == "s3://bucket-a/x"
    assert bare.spec.model.uri == "/models/x"


def test_unwritable_termination_log_is_ignored(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FINETUNE_TERMINATION_LOG", str(tmp_path / "no" / "such" / "dir" / "log"))
    assert main(["--config", str(tmp_path / "missing.yaml")]) == 11
    assert "InvalidConfig: cannot read config" in capsys.readouterr().err


def test_qlora_on_cpu_fails_fast_with_unsupported_hardware(assets, tmp_path, termination_log, monkeypatch):
    monkeypatch.setenv("FINETUNE_WORK_DIR", str(tmp_path / "work"))
    spec = lm_spec(assets, str(tmp_path / "out"), method="qlora")
    assert main(["--config", str(write_config(tmp_path / "job.yaml", spec))]) == errors.UnsupportedHardware.exit_code == 20
    line = termination_log.read_text()
    assert line.startswith("UnsupportedHardware: QLoRA needs a CUDA GPU") and line.count("\n") == 1
    # Failed before data preparation: the only output is the progress document saying so.
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["progress.json"]
    assert json.loads((tmp_path / "out" / "progress.json").read_text())["stage"] == "failed"


def test_missing_model_is_model_not_found(assets, tmp_path, termination_log, monkeypatch):
    monkeypatch.setenv("FINETUNE_WORK_DIR", str(tmp_path / "work"))
    spec = lm_spec(assets, str(tmp_path / "out"), model={"uri": str(tmp_path / "no-model")})
    assert main(["--config", str(write_config(tmp_path / "job.yaml", spec))]) == errors.ModelNotFound.exit_code
    line = termination_log.read_text().strip()
    assert line.startswith(f"ModelNotFound: {tmp_path / 'no-model'} is not a model folder")
    progress = json.loads((tmp_path / "out" / "progress.json").read_text())
    assert progress["stage"] == "failed" and progress["failureReason"] == line


def test_unexpected_exception_leaves_a_reason_and_exits_1(tmp_path, termination_log, monkeypatch, capsys):
    import finetune_trainer.train as train

    def boom(config):
        raise RuntimeError("something odd\nsecond line")

    monkeypatch.setattr(train, "run", boom)
    assert main(["--config", str(write_config(tmp_path / "job.yaml", _minimal()))]) == 1
    assert termination_log.read_text() == "RuntimeError: something odd\n"
    assert "Traceback" in capsys.readouterr().err


def test_preemption_exits_143_with_a_one_line_reason(tmp_path, termination_log, monkeypatch, capsys):
    import finetune_trainer.train as train

    def preempted(config):
        raise train.Preempted("SIGTERM before training started")

    monkeypatch.setattr(train, "run", preempted)
    assert main(["--config", str(write_config(tmp_path / "job.yaml", _minimal()))]) == errors.EXIT_PREEMPTED == 143
    assert termination_log.read_text() == "Preempted: SIGTERM before training started\n"
    assert "Preempted: SIGTERM before training started" in capsys.readouterr().err


def test_cuda_out_of_memory_becomes_out_of_memory(tmp_path, termination_log, monkeypatch):
    import torch

    import finetune_trainer.train as train

    def oom(config):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(train, "run", oom)
    assert main(["--config", str(write_config(tmp_path / "job.yaml", _minimal()))]) == errors.OutOfMemory.exit_code == 21
    line = termination_log.read_text()
    assert line.startswith("OutOfMemory: CUDA out of memory (CUDA out of memory. Tried to allocate 20.00 GiB)") and "batchSize" in line


def test_hub_model_without_network_is_model_not_found_with_a_hint(tmp_path, termination_log, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time; no network in tests
    monkeypatch.setenv("FINETUNE_WORK_DIR", str(tmp_path / "work"))
    spec = _minimal(str(tmp_path / "out"))
    spec["model"]["uri"] = "hf://no-such-org/no-such-model"
    assert main(["--config", str(write_config(tmp_path / "job.yaml", spec))]) == errors.ModelNotFound.exit_code
    line = termination_log.read_text()
    assert line.startswith("ModelNotFound: cannot load the tokenizer from hf://no-such-org/no-such-model")
    assert "need network from the pods" in line


def test_reads_the_config_the_operator_renders(tmp_path):
    """Contract with the operator: its ConfigMap's job.yaml (manifest with every default filled in) loads as is."""
    from finetune_api.spec import FineTuneJobSpec
    from finetune_operator.builders import Owner, render_trainer_config

    spec = FineTuneJobSpec.model_validate(_minimal("s3://bucket-a/out"))
    path = tmp_path / "job.yaml"
    path.write_text(render_trainer_config(Owner(name="llama-support", namespace="team-a", uid="u-1", generation=3), spec))
    config = load_config(path)
    assert config.name == "llama-support"
    assert config.spec == spec and config.output_uri == "s3://bucket-a/out"
