"""The entry point's contract with the operator: one ``Reason: message`` line in the termination log
and on stderr, and the reason's own exit code."""

from __future__ import annotations

import gzip
import json
import socket

import pytest
import yaml

from finetune_trainer import errors
from finetune_trainer.__main__ import main
from finetune_trainer.config import load_config
from helpers_assets import assets, lm_rows, lm_spec, sentiment_rows, write_config, write_jsonl  # noqa: F401


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


# ------------------------------------------------------------------- data and storage failures
# Each case builds a spec (on the real tiny Llama / MiniLM assets) whose run fails for a user-caused
# reason, and returns it with a fragment its one-line message must contain.


def _dataset_missing(assets, tmp_path, monkeypatch, request):
    missing = str(tmp_path / "no-such-data.jsonl")
    return lm_spec(assets, str(tmp_path / "out"), dataset={"train": missing}), f"dataset {missing} not found"


def _too_many_malformed_rows(assets, tmp_path, monkeypatch, request):
    path = tmp_path / "train.jsonl"
    good = [json.dumps(r) for r in lm_rows(20)]
    path.write_text("\n".join(good[:10] + ['{"prompt": "cut off', "[1, 2]", '{"prompt": "no completion"}'] + good[10:]) + "\n")
    return lm_spec(assets, str(tmp_path / "out"), dataset={"train": str(path)}), f"3 of 23 rows of train data {path} could not be parsed"


def _truncated_gzip(assets, tmp_path, monkeypatch, request):
    path = tmp_path / "train.jsonl.gz"
    packed = gzip.compress("".join(json.dumps(r) + "\n" for r in lm_rows(3000)).encode())
    path.write_bytes(packed[: len(packed) // 2])
    return lm_spec(assets, str(tmp_path / "out"), dataset={"train": str(path)}), f"{path} is corrupt or truncated"


def _unknown_label(assets, tmp_path, monkeypatch, request):
    rows = sentiment_rows(12)
    rows[7] = {"text": "the plot was fine i guess", "label": "neutral"}
    train = write_jsonl(tmp_path / "sentiment.jsonl", rows)
    spec = lm_spec(assets, str(tmp_path / "out"),
                   model={"uri": assets["minilm"], "task": "sequence-classification", "labels": ["negative", "positive"]},
                   dataset={"train": train, "format": "classification"})
    return spec, f"'neutral' in row {train}:8"


def _s3_endpoint_refuses(assets, tmp_path, monkeypatch, request):
    # A bound socket that never listens: connecting is refused at once (no connect timeout to wait out),
    # and the port cannot be taken by anyone else while the test runs.
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    request.addfinalizer(sock.close)
    endpoint = f"http://127.0.0.1:{sock.getsockname()[1]}"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")  # signing needs some credentials before any connection
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    spec = lm_spec(assets, str(tmp_path / "out"), dataset={"train": "s3://data/train.jsonl"},
                   storage={"endpoint": endpoint, "region": "us-east-1"})
    return spec, f"could not reach the object store at {endpoint} to list s3://data/train.jsonl"


def _leakage_fail(assets, tmp_path, monkeypatch, request):
    rows = lm_rows(40, seed=1)
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    val = write_jsonl(tmp_path / "val.jsonl", lm_rows(6, seed=2) + rows[:2])
    spec = lm_spec(assets, str(tmp_path / "out"), dataset={"train": train, "validation": val, "leakageCheck": "fail"})
    return spec, "2 validation/test examples also appear in train (validation: 2 exact, 0 near); e.g. "


@pytest.mark.parametrize(
    "error, case",
    [
        (errors.DatasetNotFound, _dataset_missing),
        (errors.MalformedData, _too_many_malformed_rows),
        (errors.MalformedData, _truncated_gzip),
        (errors.UnknownLabel, _unknown_label),
        (errors.S3EndpointError, _s3_endpoint_refuses),
        (errors.LeakageDetected, _leakage_fail),
    ],
    ids=lambda v: v.__name__.lstrip("_") if callable(v) and not isinstance(v, type) else None,
)
def test_user_caused_data_failures_exit_with_their_reason(error, case, assets, tmp_path, termination_log, monkeypatch, capsys, request):
    monkeypatch.setenv("FINETUNE_WORK_DIR", str(tmp_path / "work"))
    spec, fragment = case(assets, tmp_path, monkeypatch, request)
    code = main(["--config", str(write_config(tmp_path / "job.yaml", spec))])
    assert code == error.exit_code and code not in (0, 1)
    text = termination_log.read_text()
    assert text.count("\n") == 1 and text.endswith("\n")  # exactly one line
    line = text.strip()
    assert line.startswith(f"{error.reason}: ") and fragment in line, line
    err = capsys.readouterr().err
    assert line in err and "Traceback" not in err  # the reason, not a stack trace
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


def test_a_preempted_rank_does_not_hide_the_failing_ranks_reason(termination_log):
    """torchrun SIGTERMs the other local ranks when one fails; their Preempted line must not replace its reason."""
    from finetune_trainer.__main__ import write_termination_message

    write_termination_message("LeakageDetected: 3 validation/test examples also appear in train")
    write_termination_message("Preempted: SIGTERM before training started")
    assert termination_log.read_text() == "LeakageDetected: 3 validation/test examples also appear in train\n"
    termination_log.write_text("Preempted: SIGTERM: checkpointed at step 4\n")
    write_termination_message("Preempted: SIGTERM: checkpointed at step 5")  # a preemption replaces a preemption
    assert termination_log.read_text() == "Preempted: SIGTERM: checkpointed at step 5\n"
    write_termination_message("OutOfMemory: CUDA out of memory")  # and a real reason replaces anything
    assert termination_log.read_text() == "OutOfMemory: CUDA out of memory\n"
