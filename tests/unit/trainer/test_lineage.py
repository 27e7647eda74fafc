"""model.fromJob in the trainer: the parent leaves its test set and data-report digest, a child merges the parent's
adapter chain, trains on top, is evaluated on the parent's test set, and the regression gate warns or fails."""

from __future__ import annotations

import hashlib
import json
import math

import pytest
from finetune_api.spec import RegressionSpec, parse_spec

from finetune_operator.lineage import lineage_env, resolve_parent
from finetune_trainer.errors import InvalidConfig, RegressionDetected
from finetune_trainer.lineage import Parent, enforce, gate_metric, regression_gate

from helpers_assets import assets, lm_spec, run_trainer, write_config  # noqa: F401 - the session fixture


# ------------------------------------------------------------------------------------------- pure


def test_the_gate_measures_the_drop_in_the_metrics_own_direction():
    higher = regression_gate("accuracy", 0.90, 0.85, RegressionSpec(max_drop=0.1))
    assert (higher.direction, higher.passed) == ("max", True) and higher.drop == pytest.approx(0.05)
    lower = regression_gate("eval_loss", 1.0, 1.3, RegressionSpec(max_drop=0.2, action="warn"))
    assert (lower.direction, lower.passed, lower.action) == ("min", False, "warn") and lower.drop == pytest.approx(0.3)
    better = regression_gate("eval_loss", 1.0, 0.7, None)  # default: maxDrop 0, warn
    assert better.passed and better.drop == pytest.approx(-0.3) and better.max_drop == 0.0
    diverged = regression_gate("eval_loss", 1.0, math.nan, None)
    assert diverged.passed is False and diverged.drop is None
    enforce(lower)  # warn: logged, not raised
    failed = regression_gate("accuracy", 0.9, 0.7, RegressionSpec(max_drop=0.1, action="fail"))
    assert failed.passed is False and failed.drop == pytest.approx(0.2)
    with pytest.raises(RegressionDetected, match=r"accuracy went from 0.9 \(parent\) to 0.7 .*maxDrop 0.1"):
        enforce(failed)


def test_the_gate_metric_defaults_to_the_headline_metric_and_must_be_computed():
    base = {"model": {"fromJob": {"name": "p"}}, "dataset": {"train": "s3://data/t.jsonl"}, "output": {"uri": "s3://out/c"}}
    assert gate_metric(parse_spec(base), "eval_loss") == "eval_loss"
    clf = {**base, "model": {"fromJob": {"name": "p"}, "task": "sequence-classification"}, "dataset": {"train": "s3://data/t", "format": "classification"}}
    assert gate_metric(parse_spec(clf), "eval_loss") == "accuracy"  # a classifier's gain is on accuracy
    assert gate_metric(parse_spec({**clf, "evaluation": {"regression": {"metric": "f1_macro"}}}), "eval_loss") == "f1_macro"
    with pytest.raises(InvalidConfig, match="'accuracy' is not computed on a test set for this task"):
        gate_metric(parse_spec({**base, "evaluation": {"regression": {"metric": "accuracy"}}}), "eval_loss")


def test_without_the_operators_variables_a_from_job_config_says_what_to_do():
    spec = parse_spec({"model": {"fromJob": {"name": "p"}}, "dataset": {"train": "s3://data/t.jsonl"}, "output": {"uri": "s3://out/c"}})
    with pytest.raises(InvalidConfig, match="resolved by the operator.*FINETUNE_PARENT_MODEL_URI.*use model.uri"):
        Parent.from_env(spec, environ={})


# -------------------------------------------------------------------------------- parent -> child


def parent_test_rows(out):
    import pyarrow.parquet as pq

    return pq.read_table(str(out / "test-set.parquet")).to_pylist()


def _progress(out):
    return json.loads((out / "progress.json").read_text())


def _parent_body(name: str, spec: dict, out) -> dict:
    """The parent FineTuneJob as the operator would hold it, its status projected from the trainer's progress."""
    progress = _progress(out)
    status = {"phase": "Succeeded", "modelUri": progress["modelUri"], "data": progress["data"], "testSetUri": progress["testSetUri"]}
    return {"metadata": {"name": name, "namespace": "ns", "uid": "uid-parent"}, "spec": spec, "status": status}


def test_a_child_starts_from_its_lora_parent_and_is_gated_on_the_parents_test_set(assets, tmp_path):  # noqa: F811
    parent_out = tmp_path / "parent"
    parent_spec = lm_spec(assets, str(parent_out), hyperparameters={"maxSteps": 8})
    r = run_trainer(write_config(tmp_path / "parent.yaml", parent_spec, name="parent"), tmp_path / "p")
    assert r.returncode == 0, r.stderr[-3000:]
    progress = _progress(parent_out)
    # The parent leaves what a child needs: its test split and the digest of the data report as written.
    assert progress["testSetUri"] == str(parent_out / "test-set.parquet") and (parent_out / "test-set.parquet").exists()
    digest = "sha256:" + hashlib.sha256((parent_out / "data-report.json").read_bytes()).hexdigest()
    assert progress["data"]["reportDigest"] == digest

    # The operator's resolution (pure) turns the parent object into the child's lineage and pod env.
    child_spec = lm_spec(assets, str(tmp_path / "child"), model={"fromJob": {"name": "parent"}, "uri": None},
                         hyperparameters={"maxSteps": 4, "learningRate": 0.002}, evaluation={"regression": {"maxDrop": 0.5}})
    resolution = resolve_parent("child", "ns", parse_spec(child_spec), _parent_body("parent", parent_spec, parent_out))
    lineage = resolution.value
    assert lineage is not None and lineage.parent_model_uri == str(parent_out / "model")
    assert lineage.base_model_uri == assets["llama"] and lineage.adapters == [str(parent_out / "model")]
    env = {e["name"]: e["value"] for e in lineage_env(lineage)}
    r = run_trainer(write_config(tmp_path / "child.yaml", child_spec, name="child"), tmp_path / "c", **env)
    assert r.returncode == 0, r.stderr[-3000:]
    regression = _progress(tmp_path / "child")["regression"]
    parent_test = progress["evaluation"]["test"]
    assert regression["metric"] == "eval_loss" and regression["parent"] == pytest.approx(parent_test["eval_loss"])
    assert regression["testRows"] == len(parent_test_rows(parent_out)) > 0
    assert regression["drop"] == pytest.approx(regression["child"] - regression["parent"]) and regression["passed"] is True
    # Trained on the merged parent, the child starts where the parent ended: its first baseline is the parent's quality.
    child_report = _progress(tmp_path / "child")["evaluation"]["baseline"]
    assert child_report["reference"] == "parent_model" and "base_model" not in child_report  # named for what it is
    child_baseline = child_report["parent_model"]["eval_loss"]
    assert child_baseline < progress["evaluation"]["baseline"]["base_model"]["eval_loss"]
    card = json.loads((tmp_path / "child" / "model" / "model_card.json").read_text())
    assert card["baseModel"] == str(parent_out / "model")
    assert card["lineage"]["parentJob"] == "parent" and card["lineage"]["parentDataReportDigest"] == digest
    assert card["lineage"]["regression"]["child"] == regression["child"]
    assert "## Lineage" in (tmp_path / "child" / "model" / "README.md").read_text()

    # A child trained to be worse (a full fine-tune at a huge learning rate) fails the gate with action fail.
    worse_spec = lm_spec(assets, str(tmp_path / "worse"), model={"fromJob": {"name": "parent"}, "uri": None}, method="full", lora=None,
                         hyperparameters={"maxSteps": 3, "learningRate": 1.0, "lrScheduler": "constant", "maxGradNorm": 100.0},
                         evaluation={"useBestModel": False, "baseline": False, "regression": {"maxDrop": 0.0, "action": "fail"}})
    r = run_trainer(write_config(tmp_path / "worse.yaml", worse_spec, name="worse"), tmp_path / "w", **env)
    assert r.returncode == RegressionDetected.exit_code, r.stderr[-3000:]
    line = (tmp_path / "w" / "termination-log").read_text()
    assert line.startswith("RegressionDetected: on the parent's test set eval_loss went from") and line.count("\n") == 1
    assert not (tmp_path / "worse" / "model").exists()  # not promoted
    assert _progress(tmp_path / "worse")["regression"]["passed"] is False


# ------------------------------------------------------------------------ the parent's files are input


def _parent_with(tmp_path, **lineage):
    from finetune_api.documents import Lineage

    return Parent(Lineage(parent_job="p", parent_model_uri=str(tmp_path / "model"), parent_output_uri=str(tmp_path),
                          parent_test_set_uri=str(tmp_path / "test-set.parquet"), **lineage))


def test_the_parents_test_set_and_progress_are_checked_like_any_input(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from finetune_trainer.errors import ParentModelInvalid
    from finetune_trainer.lineage import load_parent_test_set, parent_test_metrics
    from finetune_trainer.storage import Storage

    storage, parent = Storage(), _parent_with(tmp_path)
    clf = parse_spec({"model": {"fromJob": {"name": "p"}, "task": "sequence-classification"},
                      "dataset": {"train": "/d.jsonl", "format": "classification", "limits": {"maxFileBytes": "64Ki"}}, "output": {"uri": "/out"}})

    def load(table, labels=("neg", "pos"), vocab=100):
        pq.write_table(table, str(tmp_path / "test-set.parquet"))
        return load_parent_test_set(parent, clf, storage, work_dir=tmp_path, labels=list(labels), vocab_size=vocab)

    good = pa.table({"input_ids": [[1, 2, 3], [4, 5]], "label_name": ["pos", "neg"]})
    assert load(good, labels=("pos", "neg"))["label"] == [0, 1]  # by name, onto this job's label ids
    with pytest.raises(ParentModelInvalid, match=r"labels \['pos'\] that this job's labels \['neg', 'other'\] lack"):
        load(good, labels=("neg", "other"))
    with pytest.raises(ParentModelInvalid, match="token ids outside this model's vocabulary"):
        load(good, vocab=4)
    with pytest.raises(ParentModelInvalid, match="expected input_ids and label_name"):
        load(pa.table({"input_ids": [[1]], "labels": [[1]]}))
    with pytest.raises(ParentModelInvalid, match="over dataset.limits.maxFileBytes"):
        rng = __import__("random").Random(0)
        load(pa.table({"input_ids": [[rng.randrange(100) for _ in range(90)] for _ in range(400)], "label_name": ["pos"] * 400}))
    (tmp_path / "test-set.parquet").write_bytes(b"not parquet")
    with pytest.raises(ParentModelInvalid, match="not readable Parquet"):
        load_parent_test_set(parent, clf, storage, work_dir=tmp_path, labels=["neg", "pos"], vocab_size=100)

    (tmp_path / "progress.json").write_text(json.dumps({"stage": "done", "evaluation": {"test": {"accuracy": 0.75, "per_class": {}}}}))
    assert parent_test_metrics(parent, storage) == {"accuracy": 0.75}
    (tmp_path / "progress.json").write_text('{"stage": "done", "x": "' + "a" * (9 << 20) + '"}')
    with pytest.raises(ParentModelInvalid, match="over 8388608 bytes"):
        parent_test_metrics(parent, storage)
    (tmp_path / "progress.json").write_text('{"step": "many"}')
    with pytest.raises(ParentModelInvalid, match="is not a progress document"):
        parent_test_metrics(parent, storage)
