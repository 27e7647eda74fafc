"""The FineTuneSweep spec model, its generated CRD, and that the committed CRD is not stale."""

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from finetune_api import sweep, sweep_crd
from finetune_api.sweep import parse_sweep, trial_spec

ROOT = Path(__file__).resolve().parents[3]
COMMITTED = ROOT / "crds" / "finetune.io_finetunesweeps.yaml"

TEMPLATE = {
    "model": {"uri": "s3://models/tiny-llama"},
    "dataset": {"train": "s3://data/train.jsonl"},
    "output": {"uri": "s3://out/sweep-1"},
}
LR = {"path": "hyperparameters.learningRate", "type": "log-uniform", "low": 1e-5, "high": 1e-2}
RANK = {"path": "lora.r", "type": "choice", "values": [4, 8, 16]}


def _sweep(**extra):
    return {"template": TEMPLATE, "searchSpace": [LR, RANK], **extra}


def test_defaults_and_inferred_direction():
    s = parse_sweep(_sweep())
    assert s.objective.metric == "eval_loss" and s.direction == "min"
    assert s.search.algorithm == "tpe" and s.search.seed == 0
    assert (s.max_trials, s.parallelism, s.max_failed_trials) == (10, 1, 3)
    accuracy = parse_sweep({**_sweep(objective={"metric": "accuracy"}),
                            "template": {**TEMPLATE, "evaluation": {"earlyStopping": {"metric": "accuracy"}}}})
    assert accuracy.direction == "max"


def test_trial_spec_sets_the_params_and_its_own_output():
    s = parse_sweep(_sweep())
    job = trial_spec(s.template, {"hyperparameters.learningRate": 3e-4, "lora.r": 8}, "sw-t3")
    assert job.hyperparameters.learning_rate == 3e-4
    assert job.lora is not None and job.lora.r == 8
    assert job.output.uri == "s3://out/sweep-1/sw-t3"


BAD = [
    (_sweep(searchSpace=[{"path": "hyperparameters.seed", "type": "int", "low": 1, "high": 3}]), "not searchable"),
    (_sweep(searchSpace=[{"path": "hyperparameters.learningRate", "type": "log-uniform", "low": 0, "high": 1e-2}]), "low > 0"),
    (_sweep(searchSpace=[{"path": "hyperparameters.learningRate", "type": "uniform", "low": 0.1, "high": 0.01}]), "low must be less"),
    (_sweep(searchSpace=[{"path": "lora.r", "type": "uniform", "low": 2, "high": 8}]), "int-valued"),
    (_sweep(searchSpace=[LR, LR]), "distinct"),
    (_sweep(search={"algorithm": "grid"}), "a grid needs type choice or int"),
    (_sweep(objective={"metric": "accuracy"}), "monitored metric"),
    (_sweep(searchSpace=[{"path": "hyperparameters.learningRate", "type": "choice", "values": [0.5, 2.0]}]), "learningRate=2.0 does not make a valid"),
    ({**_sweep(), "template": {**TEMPLATE, "method": "full"}}, "need template.method lora"),
    (_sweep(searchSpace=[RANK, {"path": "method", "type": "choice", "values": ["lora", "full"]}]), "every method value to be lora"),
    (_sweep(objective={"metric": "eval_loss", "split": "test"}), "selecting trials on the test split leaks it"),
    (_sweep(final={"action": "promote", "overrides": {"hyperparameters": {"maxSteps": 5}}}), "only valid with action retrain"),
    (_sweep(final={"action": "retrain", "overrides": {"output": {"uri": "s3://elsewhere"}}}), "may not set output"),
    (_sweep(final={"action": "retrain", "overrides": {"hyperparameters": {"learningRate": -1}}}), "final.overrides does not make a valid FineTuneJob"),
    ({**_sweep(pruning={"type": "median"}), "template": {**TEMPLATE, "dataset": {**TEMPLATE["dataset"], "crossValidation": {"folds": 3}}}},
     "pruning is not available with template.dataset.crossValidation"),
]


@pytest.mark.parametrize("manifest,message", BAD)
def test_bad_sweeps_say_what_to_change(manifest, message):
    with pytest.raises(ValidationError, match=message):
        parse_sweep(manifest)


def test_the_final_retraining_spec_merges_its_overrides_over_the_best_parameters():
    s = parse_sweep(_sweep(final={"action": "retrain", "overrides": {"hyperparameters": {"maxSteps": 300}, "lora": {"alpha": 64}}}))
    assert s.final.action == "retrain"
    job = trial_spec(s.template, {"hyperparameters.learningRate": 3e-4, "lora.r": 8}, "sw-final", overrides=s.final.overrides)
    assert (job.hyperparameters.max_steps, job.hyperparameters.learning_rate) == (300, 3e-4)
    assert job.lora is not None and (job.lora.r, job.lora.alpha) == (8, 64)
    assert job.output.uri == "s3://out/sweep-1/sw-final"
    assert parse_sweep(_sweep()).final.action == "promote" and parse_sweep(_sweep()).objective.split == "validation"


def test_committed_sweep_crd_matches_the_model():
    assert COMMITTED.read_text() == sweep_crd.render(), "crds/ is stale: run `make crds` and commit the result"


def test_sweep_crd_names_columns_rules_and_descriptions():
    doc = yaml.safe_load(COMMITTED.read_text())
    assert doc["spec"]["names"]["kind"] == "FineTuneSweep" and "ftsweep" in doc["spec"]["names"]["shortNames"]
    version = doc["spec"]["versions"][0]
    assert [c["name"] for c in version["additionalPrinterColumns"]] == ["Phase", "Trials", "Running", "Pruned", "Failed", "Best", "Best-Trial", "Model", "Age"]
    root = version["schema"]["openAPIV3Schema"]
    assert root["properties"]["metadata"]["properties"]["name"]["maxLength"] == sweep.MAX_SWEEP_NAME
    spec = root["properties"]["spec"]
    messages = [r["message"] for r in spec["x-kubernetes-validations"]]
    assert sweep._MONITOR_RULE in messages and sweep._GRID_RULE in messages
    param = spec["properties"]["searchSpace"]["items"]
    assert "hyperparameters.learningRate" in param["properties"]["path"]["enum"]
    assert "hyperparameters.seed" not in param["properties"]["path"]["enum"]
    assert param["properties"]["values"]["items"] == {"x-kubernetes-preserve-unknown-fields": True}
    # the template is a whole FineTuneJob spec, with its own rules and defaults
    template = spec["properties"]["template"]
    assert template["properties"]["hyperparameters"]["default"]["learningRate"] == 2e-4
    assert template["x-kubernetes-validations"]

    def walk(node, path):
        yield path, node
        for name, sub in (node.get("properties") or {}).items():
            yield from walk(sub, f"{path}.{name}")

    missing = [p for p, n in walk(spec, "spec") if not n.get("description")]
    assert missing == []


def test_the_sweep_example_validates_and_asks_for_six_pruned_trials_two_at_a_time():
    manifest = yaml.safe_load((ROOT / "examples" / "sweeps" / "sentiment-sweep.yaml").read_text())
    assert manifest["kind"] == "FineTuneSweep"
    s = parse_sweep(manifest["spec"])
    assert (s.max_trials, s.parallelism) == (6, 2) and s.pruning is not None
    assert s.objective.metric == "eval_loss" and s.direction == "min"
