"""spec.tracking: defaults, and bad input refused with a message saying what to change (in the trainer's
model and in the CRD the API server enforces)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from finetune_api.crd import crd as build_crd
from finetune_api.spec import parse_spec

BASE = {"model": {"uri": "s3://models/m"}, "dataset": {"train": "s3://data/t"}, "output": {"uri": "s3://out/r"}}


def test_tensorboard_on_and_mlflow_off_by_default():
    spec = parse_spec(BASE)
    assert spec.tracking.tensorboard is True and spec.tracking.mlflow is None
    spec = parse_spec({**BASE, "tracking": {"tensorboard": False, "mlflow": {"uri": "http://mlflow:5000"}}})
    assert spec.tracking.tensorboard is False
    assert (spec.tracking.mlflow.uri, spec.tracking.mlflow.experiment, spec.tracking.mlflow.register_model) == ("http://mlflow:5000", None, None)


@pytest.mark.parametrize("mlflow, where", [
    ({"uri": "file:///tmp/mlruns"}, "tracking.mlflow.uri"),
    ({"uri": "databricks"}, "tracking.mlflow.uri"),
    ({"uri": "https://user:secret@mlflow:5000"}, "tracking.mlflow.uri"),  # credentials only through credentialsSecret
    ({"uri": "http://m:5000", "registerModel": "has space"}, "tracking.mlflow.registerModel"),
    ({"uri": "http://m:5000", "password": "x"}, "tracking.mlflow.password"),  # credentials only through credentialsSecret
    ({"experiment": "e"}, "tracking.mlflow.uri"),
])
def test_bad_mlflow_settings_are_refused_naming_the_field(mlflow, where):
    from finetune_api.validation import validation_message

    with pytest.raises(ValidationError) as e:
        parse_spec({**BASE, "tracking": {"mlflow": mlflow}})
    assert where in validation_message(e.value)


def test_the_crd_documents_tracking_and_keeps_it_immutable():
    crd = build_crd()
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    mlflow = schema["properties"]["tracking"]["properties"]["mlflow"]
    assert mlflow["required"] == ["uri"] and mlflow["properties"]["uri"]["pattern"] == r"^https?://[^\s/@]+(/[^\s]*)?$"
    assert "storage.allowedEndpoints" in mlflow["properties"]["uri"]["description"]
    assert schema["properties"]["tracking"]["properties"]["tensorboard"]["default"] is True
    immutable = [r for r in schema["x-kubernetes-validations"] if r.get("reason") == "FieldValueForbidden"]
    assert "self.tracking == oldSelf.tracking" in immutable[0]["rule"]
