"""Bad input is rejected by the API server itself (schema + CEL rules), with a message a person can act
on; the same table is checked against the pydantic model, so the two definitions cannot drift."""

from __future__ import annotations

import copy
import json

import pytest
from pydantic import ValidationError

from finetune_api.spec import parse_spec

pytestmark = pytest.mark.cluster

GOOD = {
    "model": {"uri": "s3://models/tiny"},
    "dataset": {"train": "s3://data/train.jsonl"},
    "output": {"uri": "s3://out/run"},
}


def with_(path: str, value):
    spec = copy.deepcopy(GOOD)
    node = spec
    keys = path.split(".")
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    node[keys[-1]] = value
    return spec


CLASSIFY = {"model": {"uri": "s3://models/m", "task": "sequence-classification"}, "dataset": {"train": "s3://data/x", "format": "classification"}, "output": {"uri": "s3://out/x"}}
# A DPO job on preference pairs that the API server accepts (packing must be off: the pairs are scored unpacked).
PREFER = {"model": {"uri": "s3://models/m"}, "dataset": {"train": "s3://data/x", "format": "preference"}, "objective": {"type": "dpo"},
          "hyperparameters": {"packing": False}, "output": {"uri": "s3://out/x"}}


def prefer_with(**parts):
    spec = copy.deepcopy(PREFER)
    for key, value in parts.items():
        spec[key] = {**spec.get(key, {}), **value}
    return spec


# (id, spec, text the API server's message must contain)
BAD_SPECS = [
    ("method-enum", with_("method", "adam"), 'Unsupported value: "adam"'),
    ("task-enum", with_("model.task", "translation"), 'Unsupported value: "translation"'),
    ("format-enum", with_("dataset.format", "xml"), 'Unsupported value: "xml"'),
    ("leakage-enum", with_("dataset.leakageCheck", "ignore"), 'Unsupported value: "ignore"'),
    ("precision-enum", with_("hyperparameters.precision", "int3"), 'Unsupported value: "int3"'),
    ("lr-positive", with_("hyperparameters.learningRate", 0), "should be greater than 0"),
    ("warmup-ratio", with_("hyperparameters.warmupRatio", 1.0), "should be less than 1"),
    ("nodes-min", with_("resources.nodes", 0), "should be greater than or equal to 1"),
    ("lora-rank", with_("lora", {"r": 0}), "should be greater than or equal to 1"),
    ("model-uri", with_("model.uri", "ftp://models/x"), "should match"),
    ("train-uri", with_("dataset.train", "data/train.jsonl"), "should match"),
    ("output-uri", with_("output.uri", "gs://bucket/out"), "should match"),
    ("missing-output", {k: v for k, v in GOOD.items() if k != "output"}, "Required value"),
    ("unknown-field", with_("hyperparameters.learningRat", 0.1), 'unknown field "spec.hyperparameters.learningRat"'),
    ("lora-with-full", {**with_("method", "full"), "lora": {"r": 8}}, "spec.lora is only valid with method lora, qlora or dora"),
    ("epochs-and-steps", with_("hyperparameters", {"epochs": 1, "maxSteps": 10}), "set hyperparameters.epochs or hyperparameters.maxSteps, not both"),
    ("split-sum", with_("dataset.split", {"validation": 0.5, "test": 0.5}), "dataset.split.validation + dataset.split.test must be below 1"),
    ("labels-without-classification", with_("model.labels", ["pos", "neg"]), "only valid with task sequence-classification"),
    ("classification-format-mismatch", with_("dataset.format", "classification"), "classification goes with model.task sequence-classification"),
    ("numlabels-mismatch", {**CLASSIFY, "model": {**CLASSIFY["model"], "labels": ["a", "b"], "numLabels": 3}}, "model.numLabels must equal the number of model.labels"),
    ("secret-name", with_("storage.credentialsSecret", {"name": "Bad_Name"}), "should match"),
    ("endpoint-url", with_("storage.endpoint", "minio:9000"), "should match"),
    ("strategy-enum", with_("hyperparameters.distributedStrategy", "zero3"), 'Unsupported value: "zero3"'),
    ("fsdp-with-lora", with_("hyperparameters.distributedStrategy", "fsdp"), "distributedStrategy fsdp needs method full"),
    ("record-cap-quantity", with_("dataset.limits.maxRecordBytes", "16MB"), "should match"),
    ("file-cap-zero", with_("dataset.limits.maxFileBytes", "0Gi"), "should match"),
    ("expansion-below-one", with_("dataset.limits.maxNormalizationExpansion", 0.5), "should be greater than or equal to 1"),
    ("cache-size-plain-number", with_("resources.cacheSize", "100"), "should match"),
    ("scratch-size-decimal", with_("resources.scratchSize", "1.5Gi"), "should match"),
    ("seq2seq-text-format", {**with_("model.task", "seq2seq-lm"), "hyperparameters": {"packing": False}},
     "model.task seq2seq-lm needs dataset.format prompt-completion"),
    ("seq2seq-packed", {**with_("model.task", "seq2seq-lm"), "dataset": {"train": "s3://data/x", "format": "prompt-completion"},
                        "hyperparameters": {"packing": True}},
     "model.task seq2seq-lm needs hyperparameters.packing false"),
    ("teacher-uri", with_("distillation", {"teacher": {"uri": "ftp://models/t"}}), "should match"),
    ("teacher-uri-and-job", with_("distillation", {"teacher": {"uri": "s3://models/t", "fromJob": {"name": "teacher"}}}),
     "set exactly one of distillation.teacher.uri and distillation.teacher.fromJob"),
    ("distillation-temperature", with_("distillation", {"teacher": {"uri": "s3://models/t"}, "temperature": 0}), "should be greater than 0"),
    ("distillation-alpha", with_("distillation", {"teacher": {"uri": "s3://models/t"}, "alpha": 1.5}), "should be less than or equal to 1"),
    ("output-inside-teacher", {**with_("distillation", {"teacher": {"uri": "s3://out"}})},
     "output.uri must not equal, contain or lie inside distillation.teacher.uri"),
    ("preference-format-without-objective", with_("dataset.format", "preference"),
     "dataset.format preference goes with objective.type dpo or simpo, and only with it"),
    ("dpo-without-preference-format", {**with_("objective", {"type": "dpo"}), "hyperparameters": {"packing": False}},
     "dataset.format preference goes with objective.type dpo or simpo, and only with it"),
    ("dpo-with-packing", prefer_with(hyperparameters={"packing": True}), "objective.type dpo and simpo need hyperparameters.packing false"),
    ("dpo-with-retention", prefer_with(evaluation={"retention": {"dataset": "s3://data/r"}}), "evaluation.retention is not supported with objective.type dpo or simpo"),
    ("simpo-with-bleu", prefer_with(objective={"type": "simpo"}, evaluation={"metrics": ["bleu"]}), "evaluation.metrics bleu and rouge are not computed"),
    ("beta-with-sft", with_("objective", {"type": "sft", "beta": 0.1}), "objective.beta is only valid with objective.type dpo or simpo"),
    ("gamma-with-dpo", prefer_with(objective={"gamma": 1.0}), "objective.gamma is only valid with objective.type simpo"),
    ("objective-enum", prefer_with(objective={"type": "ppo"}), 'Unsupported value: "ppo"'),
    ("dpo-with-distillation", prefer_with(distillation={"teacher": {"uri": "s3://models/t"}}), "distillation is not supported with objective.type dpo or simpo"),
    ("uri-and-from-job", with_("model.fromJob", {"name": "parent"}), "set exactly one of model.uri and model.fromJob"),
    ("neither-uri-nor-from-job", {**GOOD, "model": {"task": "causal-lm"}}, "set exactly one of model.uri and model.fromJob"),
    ("regression-without-parent", with_("evaluation.regression", {"maxDrop": 0.01}), "evaluation.regression needs model.fromJob"),
    ("regression-action-enum", {**GOOD, "model": {"fromJob": {"name": "parent"}}, "evaluation": {"regression": {"action": "ignore"}}},
     'Unsupported value: "ignore"'),
    ("cv-with-validation-file", with_("dataset", {"train": "s3://data/x", "validation": "s3://data/v", "crossValidation": {"folds": 3}}),
     "dataset.crossValidation makes its own validation folds from the training rows; remove dataset.validation"),
    ("cv-resume-uri", {**with_("dataset.crossValidation", {"folds": 3}), "checkpoint": {"resume": "s3://out/run/checkpoints/step-00000010"}},
     "checkpoint.resume must be latest or none"),
    ("cv-one-fold", with_("dataset.crossValidation", {"folds": 1}), "should be greater than or equal to 2"),
    ("cv-too-many-folds", with_("dataset.crossValidation", {"folds": 21}), "should be less than or equal to 20"),
]


def manifest(name: str, spec: dict) -> dict:
    return {"apiVersion": "finetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name}, "spec": spec}


@pytest.mark.parametrize("case_id,spec,message", BAD_SPECS, ids=[c[0] for c in BAD_SPECS])
def test_api_server_rejects_bad_spec(kubectl, crd_installed, namespace, case_id, spec, message):
    proc = kubectl.run("create", "-n", namespace, "-f", "-", input=json.dumps(manifest(case_id, spec)), check=False)
    assert proc.returncode != 0, f"{case_id} was accepted"
    assert message in proc.stderr, proc.stderr
    # and the typed model refuses it too (the operator and the trainer use that one)
    with pytest.raises(ValidationError):
        parse_spec(spec)


def test_good_spec_is_accepted_with_defaults_filled_in(kubectl, crd_installed, namespace):
    kubectl.run("create", "-n", namespace, "-f", "-", input=json.dumps(manifest("good", GOOD)))
    stored = kubectl.get("ftj", "good", namespace)["spec"]
    assert stored["method"] == "lora"
    assert stored["hyperparameters"]["learningRate"] == 0.0002
    assert stored["dataset"]["split"] == {"validation": 0.1, "test": 0.1, "seed": 42, "stratify": True}
    assert stored["runPolicy"]["backoffLimit"] == 3
    assert stored["dataset"]["limits"] == {"maxFileBytes": "32Gi", "maxRecordBytes": "16Mi", "maxNormalizationExpansion": 4}
    assert (stored["resources"]["cacheSize"], stored["resources"]["scratchSize"]) == ("40Gi", "20Gi")
    assert parse_spec(stored) == parse_spec(GOOD)


def test_a_preference_spec_is_accepted_and_reads_back_the_same(kubectl, crd_installed, namespace):
    kubectl.run("create", "-n", namespace, "-f", "-", input=json.dumps(manifest("prefer", PREFER)))
    stored = kubectl.get("ftj", "prefer", namespace)["spec"]
    assert stored["objective"] == {"type": "dpo"} and stored["dataset"]["fields"]["chosen"] == "chosen"
    parsed = parse_spec(stored)
    assert parsed == parse_spec(PREFER) and parsed.objective.beta == 0.1  # the paper's beta, filled by the model


def test_spec_is_immutable_except_run_policy(kubectl, crd_installed, namespace):
    kubectl.run("create", "-n", namespace, "-f", "-", input=json.dumps(manifest("frozen", GOOD)))
    proc = kubectl.run("patch", "ftj", "frozen", "-n", namespace, "--type=merge", "-p",
                       '{"spec":{"model":{"uri":"s3://models/other"}}}', check=False)
    assert proc.returncode != 0 and "spec is immutable after creation except spec.runPolicy" in proc.stderr
    proc = kubectl.run("patch", "ftj", "frozen", "-n", namespace, "--type=merge", "-p",
                       '{"spec":{"lora":{"r":4}}}', check=False)
    assert proc.returncode != 0 and "immutable" in proc.stderr
    kubectl.run("patch", "ftj", "frozen", "-n", namespace, "--type=merge", "-p",
                '{"spec":{"runPolicy":{"suspend":true,"backoffLimit":5,"activeDeadlineSeconds":600}}}')
    stored = kubectl.get("ftj", "frozen", namespace)["spec"]["runPolicy"]
    assert stored["suspend"] is True and stored["backoffLimit"] == 5
