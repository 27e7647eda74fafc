"""The spec model: defaults, camelCase wire format, and the cross-field rules."""

import pytest
from pydantic import ValidationError

from finetune_api.spec import FineTuneJobSpec, parse_spec

MINIMAL = {
    "model": {"uri": "s3://models/tiny-llama"},
    "dataset": {"train": "s3://data/train.jsonl"},
    "output": {"uri": "s3://out/run-1"},
}


def test_minimal_spec_gets_sane_defaults():
    spec = parse_spec(MINIMAL)
    assert spec.method == "lora"
    assert spec.model.task == "causal-lm"
    assert spec.hyperparameters.learning_rate == 2e-4
    assert spec.hyperparameters.total_epochs == 3.0
    assert spec.dataset.split.validation == 0.1 and spec.dataset.split.seed == 42
    assert spec.dataset.leakage_check == "fail"
    assert spec.checkpoint.resume == "latest"
    assert spec.resources.nodes == 1 and spec.resources.gpus_per_node == 1
    assert spec.run_policy.backoff_limit == 3 and spec.run_policy.suspend is False


def test_wire_format_is_camel_case_and_round_trips():
    spec = parse_spec({**MINIMAL, "hyperparameters": {"maxSteps": 10, "gradientAccumulationSteps": 4}})
    wire = spec.wire()
    assert wire["hyperparameters"]["maxSteps"] == 10
    assert wire["hyperparameters"]["gradientAccumulationSteps"] == 4
    assert wire["runPolicy"]["backoffLimit"] == 3
    assert "max_steps" not in wire["hyperparameters"]
    assert FineTuneJobSpec.model_validate(wire) == spec


BAD = [
    ({"method": "full", "lora": {"r": 8}}, "spec.lora is only valid with method lora"),
    ({"hyperparameters": {"epochs": 1, "maxSteps": 5}}, "not both"),
    ({"dataset": {"train": "s3://data/x", "split": {"validation": 0.6, "test": 0.5}}}, "must be below 1"),
    ({"model": {"uri": "s3://models/m", "labels": ["a", "b"]}}, "only valid with task sequence-classification"),
    ({"model": {"uri": "s3://models/m", "task": "sequence-classification", "labels": ["a", "b"], "numLabels": 3},
      "dataset": {"train": "s3://data/x", "format": "classification"}}, "must equal the number"),
    ({"dataset": {"train": "s3://data/x", "format": "classification"}}, "classification goes with"),
    ({"hyperparameters": {"learningRate": 0}}, "greater than 0"),
    ({"resources": {"nodes": 0}}, "greater than or equal to 1"),
    ({"lora": {"r": 0}}, "greater than or equal to 1"),
    ({"model": {"uri": "http://example.com/model"}}, "String should match pattern"),
    ({"method": "sgd"}, "Input should be"),
    ({"hyperparameters": {"learningRat": 0.1}}, "Extra inputs are not permitted"),
    ({"model": {"uri": "s3://models/m", "task": "seq2seq-lm"}, "hyperparameters": {"packing": False}},
     "model.task seq2seq-lm needs dataset.format prompt-completion"),
    ({"model": {"uri": "s3://models/m", "task": "seq2seq-lm"}, "dataset": {"train": "s3://data/x", "format": "prompt-completion"},
      "hyperparameters": {"packing": True}}, "model.task seq2seq-lm needs hyperparameters.packing false"),
    ({"evaluation": {"generation": {"numBeams": 0}}}, "greater than or equal to 1"),
    ({"distillation": {"teacher": {"uri": "http://example.com/teacher"}}}, "String should match pattern"),
    ({"distillation": {"teacher": {"uri": "s3://models/t"}, "temperature": 0}}, "greater than 0"),
    ({"distillation": {"teacher": {"uri": "s3://models/t"}, "alpha": 1.5}}, "less than or equal to 1"),
    ({"distillation": {"teacher": {"uri": "s3://models/t", "precision": "int8"}}}, "Input should be"),
    ({"distillation": {"temperature": 2.0}}, "Field required"),
    ({"distillation": {"teacher": {"uri": "s3://models/t", "fromJob": {"name": "teacher"}}}},
     "set exactly one of distillation.teacher.uri and distillation.teacher.fromJob"),
    ({"distillation": {"teacher": {}}}, "set exactly one of distillation.teacher.uri and distillation.teacher.fromJob"),
    ({"dataset": {"train": "s3://data/x", "format": "preference"}}, "dataset.format preference goes with objective.type dpo or simpo"),
    ({"objective": {"type": "simpo"}, "hyperparameters": {"packing": False}}, "dataset.format preference goes with objective.type dpo or simpo"),
    ({"objective": {"type": "dpo"}, "dataset": {"train": "s3://data/x", "format": "preference"}, "hyperparameters": {"packing": True}},
     "objective.type dpo and simpo need hyperparameters.packing false"),
    ({"objective": {"type": "sft", "beta": 0.5}}, "objective.beta is only valid with objective.type dpo or simpo"),
    ({"objective": {"type": "dpo", "gamma": 0.5}}, "objective.gamma is only valid with objective.type simpo"),
    ({"objective": {"type": "dpo"}, "dataset": {"train": "s3://data/x", "format": "preference"}, "hyperparameters": {"packing": False},
      "distillation": {"teacher": {"uri": "s3://models/t"}}}, "distillation is not supported with objective.type dpo or simpo"),
    ({"model": {"uri": "s3://models/m", "fromJob": {"name": "parent"}}}, "set exactly one of model.uri and model.fromJob"),
    ({"model": {"task": "causal-lm"}}, "set exactly one of model.uri and model.fromJob"),
    ({"model": {"fromJob": {"name": "Not_A_Name"}}}, "String should match pattern"),
    ({"model": {"fromJob": {"name": "p", "namespace": "other"}}}, "Extra inputs are not permitted"),  # same namespace only
    ({"evaluation": {"regression": {"maxDrop": 0.1}}}, "evaluation.regression needs model.fromJob"),
    ({"model": {"fromJob": {"name": "p"}}, "evaluation": {"regression": {"metric": "speed"}}}, "'speed' is not a judged metric"),
    ({"model": {"fromJob": {"name": "p"}}, "evaluation": {"regression": {"maxDrop": -1}}}, "greater than or equal to 0"),
]


PREFERENCE = {**MINIMAL, "dataset": {"train": "s3://data/x", "format": "preference"}, "hyperparameters": {"packing": False}}


def test_preference_objectives_fill_the_papers_defaults_and_refuse_what_they_do_not_compute():
    dpo = parse_spec({**PREFERENCE, "objective": {"type": "dpo"}})
    assert (dpo.objective_type, dpo.is_preference, dpo.objective.beta, dpo.objective.gamma) == ("dpo", True, 0.1, None)
    simpo = parse_spec({**PREFERENCE, "objective": {"type": "simpo", "beta": 2.5}})
    assert (simpo.objective.beta, simpo.objective.gamma) == (2.5, 1.0)
    assert parse_spec(MINIMAL).objective_type == "sft" and not parse_spec(MINIMAL).is_preference
    assert simpo.wire()["objective"] == {"type": "simpo", "beta": 2.5, "gamma": 1.0}  # stored as used
    for extra, message in (({"evaluation": {"retention": {"dataset": "s3://data/r"}}}, "evaluation.retention is not supported"),
                           ({"evaluation": {"metrics": ["rouge"]}}, "evaluation.metrics bleu and rouge are not computed")):
        with pytest.raises(ValidationError, match=message):
            parse_spec({**PREFERENCE, "objective": {"type": "dpo"}, **extra})
    with pytest.raises(ValidationError, match="dataset.format classification goes with"):
        parse_spec({**PREFERENCE, "model": {"uri": "s3://models/m", "task": "sequence-classification"}, "objective": {"type": "dpo"}})


def test_from_job_takes_the_place_of_the_uri_and_regression_defaults_to_warn():
    spec = parse_spec({**MINIMAL, "model": {"fromJob": {"name": "sentiment"}}, "evaluation": {"regression": {}}})
    assert spec.model.uri is None and spec.model.from_job is not None and spec.model.from_job.name == "sentiment"
    regression = spec.evaluation.regression
    assert regression is not None and (regression.max_drop, regression.metric, regression.action) == (0.0, None, "warn")
    assert spec.wire()["model"] == {"fromJob": {"name": "sentiment"}, "task": "causal-lm", "trustRemoteCode": False}


@pytest.mark.parametrize("patch,message", BAD, ids=[m for _, m in BAD])
def test_bad_specs_are_rejected_with_a_message(patch, message):
    with pytest.raises(ValidationError) as err:
        parse_spec({**MINIMAL, **patch})
    assert message in str(err.value)


def test_queue_name_fits_a_label_value_and_priority_class_is_a_name():
    import pytest
    from pydantic import ValidationError
    from finetune_api.spec import parse_spec

    base = {"model": {"uri": "s3://models/m"}, "dataset": {"train": "s3://data/t"}, "output": {"uri": "s3://out/x"}}
    assert parse_spec({**base, "resources": {"queueName": "q" * 63}}).resources.queue_name == "q" * 63
    with pytest.raises(ValidationError, match="at most 63"):
        parse_spec({**base, "resources": {"queueName": "q" * 64}})
    with pytest.raises(ValidationError, match="pattern"):
        parse_spec({**base, "resources": {"priorityClassName": "Not A Name"}})


OVERLAPS = [
    ("equal to the dataset", {"dataset": {"train": "s3://data/t"}, "output": {"uri": "s3://data/t/"}}, "dataset.train"),
    ("containing the dataset", {"dataset": {"train": "s3://data/sets/t.jsonl"}, "output": {"uri": "s3://data"}}, "dataset.train"),
    ("inside the model", {"model": {"uri": "s3://models/m"}, "output": {"uri": "s3://models/m/runs/1"}}, "model.uri"),
    ("inside the validation set", {"dataset": {"train": "s3://data/t", "validation": "/data/val"}, "output": {"uri": "/data/val/out"}}, "dataset.validation"),
    ("inside the teacher", {"distillation": {"teacher": {"uri": "s3://models/teacher"}}, "output": {"uri": "s3://models/teacher/student"}},
     "distillation.teacher.uri"),
    ("containing the retention set", {"evaluation": {"retention": {"dataset": "s3://out/general.jsonl"}}, "output": {"uri": "s3://out/"}},
     "evaluation.retention.dataset"),
]


def _spec_with(overrides):
    base = {"model": {"uri": "s3://models/m"}, "dataset": {"train": "s3://data/t"}, "output": {"uri": "s3://out/x"}}
    return {**base, **overrides}


import pytest as _pytest  # noqa: E402


@_pytest.mark.parametrize("overrides,field", [o[1:] for o in OVERLAPS], ids=[o[0] for o in OVERLAPS])
def test_an_output_overlapping_an_input_is_rejected(overrides, field):
    from pydantic import ValidationError
    from finetune_api.spec import parse_spec

    with _pytest.raises(ValidationError, match=f"output.uri must not equal, contain or lie inside {field}"):
        parse_spec(_spec_with(overrides))


def test_an_output_beside_its_inputs_is_fine():
    from finetune_api.spec import parse_spec

    spec = parse_spec(_spec_with({"dataset": {"train": "s3://data/t.jsonl"}, "output": {"uri": "s3://data/t.jsonl2"}}))
    assert spec.output.uri == "s3://data/t.jsonl2"  # a sibling sharing a string prefix, not a path prefix


def test_the_crd_carries_one_overlap_rule_per_input():
    from finetune_api.crd import crd

    rules = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["x-kubernetes-validations"]
    fields = [r["message"].split(" lie inside ")[1].split(" ")[0] for r in rules if r["message"].startswith("output.uri must not")]
    assert fields == ["model.uri", "dataset.train", "dataset.validation", "dataset.test", "evaluation.retention.dataset",
                      "distillation.teacher.uri"]


# ----------------------------------------------------------------------- early stopping follows the metric


def _with_early_stopping(**early_stopping):
    return parse_spec({**MINIMAL, "evaluation": {"earlyStopping": early_stopping}})


@pytest.mark.parametrize(
    ("metric", "mode"),
    [("f1_macro", "max"), ("accuracy", "max"), ("token_accuracy", "max"), ("rouge_l", "max"),
     ("eval_loss", "min"), ("perplexity", "min"), ("ece", "min"), ("my_custom_metric", "min")],
)
def test_early_stopping_mode_defaults_to_the_metric_direction(metric, mode):
    """Before the metric table, every metric defaulted to min: f1_macro early-stopped on falling F1."""
    es = _with_early_stopping(metric=metric).evaluation.early_stopping
    assert es.mode == mode and es.direction == mode
    assert _with_early_stopping(metric=metric).wire()["evaluation"]["earlyStopping"]["mode"] == mode  # stored as such


def test_an_explicit_mode_that_agrees_or_an_unknown_metric_is_accepted():
    assert _with_early_stopping(metric="accuracy", mode="max").evaluation.early_stopping.mode == "max"
    assert _with_early_stopping(metric="my_custom_metric", mode="max").evaluation.early_stopping.mode == "max"


@pytest.mark.parametrize(
    ("metric", "mode", "message"),
    [("accuracy", "min", "evaluation.earlyStopping.mode must be max for metric token_accuracy, accuracy, f1_macro"),
     ("f1_macro", "min", "(higher is better); leave mode unset to follow the metric"),
     ("eval_loss", "max", "evaluation.earlyStopping.mode must be min for metric eval_loss, perplexity, ece, rejected_reward (lower is better)")],
)
def test_a_mode_contradicting_a_known_metric_is_rejected(metric, mode, message):
    from finetune_api.validation import validation_message

    with pytest.raises(ValidationError) as err:
        _with_early_stopping(metric=metric, mode=mode)
    line = validation_message(err.value)
    assert line.startswith("spec.evaluation.earlyStopping: evaluation.earlyStopping.mode must be ") and message in line


def test_the_crd_leaves_mode_unset_and_carries_the_same_rule():
    """A schema default of min would make the API server store min for f1_macro, which the rule then rejects."""
    from finetune_api import crd, metric_catalogue

    es = crd.spec_schema()["properties"]["evaluation"]["properties"]["earlyStopping"]
    assert "default" not in es["properties"]["mode"]
    rules = {r["message"]: r["rule"] for r in es["x-kubernetes-validations"]}
    assert set(rules) == {metric_catalogue.mode_rule("min"), metric_catalogue.mode_rule("max")}
    assert "'f1_macro'" in rules[metric_catalogue.mode_rule("max")] and "self.mode == 'max'" in rules[metric_catalogue.mode_rule("max")]


SEQ2SEQ = {**MINIMAL, "model": {"uri": "s3://models/bart", "task": "seq2seq-lm"},
           "dataset": {"train": "s3://data/x", "format": "prompt-completion"}, "hyperparameters": {"packing": False}}


def test_seq2seq_with_prompt_completion_unpacked_is_accepted_and_generation_settings_default():
    spec = parse_spec(SEQ2SEQ)
    assert spec.is_seq2seq and not spec.is_classification and not parse_spec(MINIMAL).is_seq2seq
    assert (spec.evaluation.generation.max_new_tokens, spec.evaluation.generation.num_beams) == (128, 1)
    wire = parse_spec({**SEQ2SEQ, "evaluation": {"generation": {"maxNewTokens": 16, "numBeams": 4}}}).wire()
    assert wire["evaluation"]["generation"] == {"maxNewTokens": 16, "numBeams": 4}


def test_the_crd_carries_the_seq2seq_rules():
    from finetune_api import crd

    rules = {r["message"]: r["rule"] for r in crd.spec_schema()["x-kubernetes-validations"]}
    fmt = next(m for m in rules if "needs dataset.format prompt-completion" in m)
    packing = next(m for m in rules if "needs hyperparameters.packing false" in m)
    assert "self.dataset.format == 'prompt-completion'" in rules[fmt] and "!self.hyperparameters.packing" in rules[packing]


def test_is_classification():
    assert not parse_spec(MINIMAL).is_classification
    spec = parse_spec({**MINIMAL, "model": {"uri": "s3://models/m", "task": "sequence-classification"},
                       "dataset": {"train": "s3://data/x", "format": "classification"}})
    assert spec.is_classification


# -------------------------------------------------------------------------------------------- distillation


def test_distillation_defaults_and_wire_names():
    spec = parse_spec({**MINIMAL, "distillation": {"teacher": {"uri": "s3://models/teacher"}}})
    d = spec.distillation
    assert (d.teacher.uri, d.teacher.precision, d.temperature, d.alpha) == ("s3://models/teacher", "auto", 2.0, 0.5)
    assert spec.wire()["distillation"] == {"teacher": {"uri": "s3://models/teacher", "precision": "auto"}, "temperature": 2.0, "alpha": 0.5}
    assert parse_spec(MINIMAL).distillation is None and "distillation" not in parse_spec(MINIMAL).wire()


def test_distillation_is_limited_to_the_logit_tasks_in_the_model_and_the_crd():
    from finetune_api import spec as spec_module
    from finetune_api.crd import crd

    assert spec_module.DISTILLATION_TASKS == ("causal-lm", "sequence-classification")
    # seq2seq-lm has not opted in (the KD term's positions are a causal LM's shifted ones): refused with the rule's message
    assert set(spec_module.DISTILLATION_TASKS) == {t.value for t in spec_module.Task} - {"seq2seq-lm"}
    with pytest.raises(ValueError, match="distillation needs model.task causal-lm or sequence-classification"):
        parse_spec({**MINIMAL, "model": {"uri": "s3://models/m", "task": "seq2seq-lm"},
                    "dataset": {"train": "s3://data/x", "format": "prompt-completion"}, "hyperparameters": {"packing": False},
                    "distillation": {"teacher": {"uri": "s3://models/teacher"}}})
    rules = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["x-kubernetes-validations"]
    rule = next(r for r in rules if r["message"].startswith("distillation needs"))
    assert rule["rule"] == "!has(self.distillation) || self.model.task in ['causal-lm', 'sequence-classification']"


def test_packing_defaults_to_what_the_task_and_objective_can_do_and_is_stored():
    seq2seq = parse_spec({**MINIMAL, "model": {"uri": "s3://models/m", "task": "seq2seq-lm"},
                          "dataset": {"train": "s3://data/x", "format": "prompt-completion"}})
    dpo = parse_spec({**MINIMAL, "objective": {"type": "dpo"}, "dataset": {"train": "s3://data/x", "format": "preference"},
                      "hyperparameters": {"batchSize": 4}})
    assert (parse_spec(MINIMAL).hyperparameters.packing, seq2seq.hyperparameters.packing, dpo.hyperparameters.packing) == (True, False, False)
    assert seq2seq.wire()["hyperparameters"]["packing"] is False  # the job config says which was used
    assert parse_spec({**MINIMAL, "hyperparameters": {"packing": False}}).hyperparameters.packing is False
    from finetune_api.crd import crd

    hp = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["hyperparameters"]
    assert "default" not in hp["properties"]["packing"]  # the API server must not fill true before the rules run
