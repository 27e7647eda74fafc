"""A spec that does not validate reads the same in the FineTuneJob status and in the trainer's line."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from finetune_api.spec import FineTuneJobSpec
from finetune_api.validation import field_path, validation_message
from finetune_operator.handlers import parse as operator_parse
from finetune_trainer.config import parse_document
from finetune_trainer.errors import InvalidConfig

GOOD = {"model": {"uri": "s3://models/m"}, "dataset": {"train": "s3://data/t.jsonl"}, "output": {"uri": "s3://out/r"}}

BAD = {
    "bad-number": ({**GOOD, "hyperparameters": {"learningRate": 0}}, "spec.hyperparameters.learningRate: Input should be greater than 0"),
    "unknown-field": ({**GOOD, "hyperparameters": {"learningRat": 0.1}}, "spec.hyperparameters.learningRat: Extra inputs are not permitted"),
    "missing": ({k: v for k, v in GOOD.items() if k != "output"}, "spec.output: Field required"),
    "list-item": ({**GOOD, "resources": {"env": [{"name": "A", "value": "1"}, {"value": "2"}]}}, "spec.resources.env[1].name: Field required"),
    "cross-field": ({**GOOD, "method": "full", "lora": {"r": 8}}, "spec: spec.lora is only valid with method lora, qlora or dora"),
    "two-problems": ({**GOOD, "method": "adam", "hyperparameters": {"learningRate": 0}}, "(and 1 more problem)"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_operator_and_trainer_use_the_same_words(case):
    spec, expected = BAD[case]
    _, operator_message = operator_parse({"spec": spec})
    with pytest.raises(InvalidConfig) as trainer_error:
        parse_document({"apiVersion": "finetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "x"}, "spec": spec}, "x")
    assert operator_message == trainer_error.value.message
    assert expected in operator_message, operator_message


def test_more_problems_are_counted():
    with pytest.raises(ValidationError) as err:
        FineTuneJobSpec.model_validate({"model": {"uri": "ftp://x"}, "dataset": {"train": "rel"}, "output": {"uri": "gs://o"}})
    message = validation_message(err.value)
    assert message.startswith("spec.model.uri: String should match pattern")
    assert message.endswith("(and 2 more problems)")


def test_field_path_spells_fields_as_a_manifest_does():
    assert field_path(("hyperparameters", "learning_rate")) == "spec.hyperparameters.learningRate"
    assert field_path(("resources", "env", 0, "value")) == "spec.resources.env[0].value"
    assert field_path(()) == "spec"
