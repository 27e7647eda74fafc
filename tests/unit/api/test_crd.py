"""The committed CRD is generated from the spec model and must not go stale."""

from pathlib import Path

import yaml

from finetune_api import crd

ROOT = Path(__file__).resolve().parents[3]
COMMITTED = ROOT / "crds" / "finetune.io_finetunejobs.yaml"


def _walk(schema, path=""):
    yield path, schema
    for name, sub in (schema.get("properties") or {}).items():
        yield from _walk(sub, f"{path}.{name}")
    if "items" in schema:
        yield from _walk(schema["items"], f"{path}[]")


def test_committed_crd_matches_the_model():
    assert COMMITTED.read_text() == crd.render(), "crds/ is stale: run `make crds` and commit the result"


def test_every_spec_field_has_a_description_for_kubectl_explain():
    spec = crd.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    missing = [path for path, sub in _walk(spec, "spec") if not path.endswith("[]") and not sub.get("description")]
    assert missing == []


def test_schema_is_structural():
    spec = crd.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, sub in _walk(spec):
        assert "type" in sub, f"{path} has no type"
        assert "anyOf" not in sub and "$ref" not in sub and "title" not in sub, path
        if sub.get("x-kubernetes-preserve-unknown-fields"):
            assert "additionalProperties" not in sub, path


def test_printer_columns_and_status_subresource():
    version = yaml.safe_load(COMMITTED.read_text())["spec"]["versions"][0]
    assert [c["name"] for c in version["additionalPrinterColumns"]] == ["Phase", "Progress", "Train-Loss", "Eval-Loss", "Restarts", "Age"]
    assert version["subresources"] == {"status": {}}


def test_defaults_and_rules_reach_the_schema():
    spec = crd.spec_schema()
    hp = spec["properties"]["hyperparameters"]
    assert hp["default"]["learningRate"] == 2e-4 and hp["default"]["seed"] == 42
    assert hp["properties"]["learningRate"]["default"] == 2e-4
    assert hp["properties"]["learningRate"]["exclusiveMinimum"] is True
    rules = [r["rule"] for r in spec["x-kubernetes-validations"]]
    assert any("oldSelf" in r for r in rules)


def test_metadata_name_is_bounded_at_admission():
    from finetune_api.crd import crd
    from finetune_api.spec import MAX_NAME_LENGTH

    root = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    name = root["properties"]["metadata"]["properties"]["name"]
    assert (name["maxLength"], name["pattern"]) == (MAX_NAME_LENGTH, "^[a-z]([-a-z0-9]*[a-z0-9])?$")
