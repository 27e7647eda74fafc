"""Generate the FineTuneJob CustomResourceDefinition from the pydantic models.

pydantic emits JSON Schema 2020-12; the API server wants a *structural* OpenAPI v3 schema. The
translation: inline every ``$ref``, turn ``anyOf: [X, null]`` into X (optional fields are simply not
required), turn numeric ``exclusiveMinimum: n`` into ``minimum: n, exclusiveMinimum: true``, drop
``title``, and keep descriptions, defaults, enums, patterns, bounds and ``x-kubernetes-*`` extensions.

Run ``python -m finetune_api.crd > crds/finetune.io_finetunejobs.yaml`` (``make crds``); ``--sweep`` prints the
FineTuneSweep CRD (:mod:`finetune_api.sweep_crd`) instead.
"""

from __future__ import annotations

import copy
import sys
from typing import Any

import yaml
from pydantic import BaseModel

from finetune_api import spec
from finetune_api.status import FineTuneJobStatus

_KEEP = {
    "type",
    "description",
    "default",
    "enum",
    "pattern",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "maxProperties",
    "items",
    "properties",
    "required",
    "additionalProperties",
    "format",
    "nullable",
}


def _resolve(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, dict):
        if "$ref" in node:
            target = copy.deepcopy(defs[node["$ref"].split("/")[-1]])
            extra = {k: v for k, v in node.items() if k != "$ref"}
            target.update(extra)
            return _resolve(target, defs)
        return {k: _resolve(v, defs) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve(v, defs) for v in node]
    return node


def _structural(node: dict[str, Any]) -> dict[str, Any]:
    node = dict(node)
    any_of = node.pop("anyOf", None)
    if any_of is not None:
        non_null = [s for s in any_of if s.get("type") != "null"]
        if len(non_null) != 1:
            raise ValueError(f"cannot express anyOf {any_of} structurally")
        merged = dict(non_null[0])
        for k, v in node.items():  # outer keys (description, default) win
            merged[k] = v
        if merged.get("default", "unset") is None:
            merged.pop("default")
        node = merged
    for bound, flag in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(node.get(bound), (int, float)) and not isinstance(node.get(bound), bool):
            node[flag] = node.pop(bound)
            node[bound] = True
    out: dict[str, Any] = {}
    for k, v in node.items():
        if k.startswith("x-kubernetes-"):
            out[k] = v
        elif k not in _KEEP:
            continue
        elif k == "properties":
            out[k] = {name: _structural(sub) for name, sub in v.items()}
        elif k == "items":
            out[k] = _structural(v)
        elif k == "additionalProperties":
            out[k] = _structural(v) if isinstance(v, dict) else v
        elif k == "default" and v == {}:
            out[k] = {}
        else:
            out[k] = v
    if out.get("x-kubernetes-preserve-unknown-fields"):
        out.setdefault("type", "object")
        if out.get("additionalProperties") is True:  # structural schemas forbid it beside preserve-unknown-fields
            out.pop("additionalProperties")
    if "type" not in out and "properties" in out:
        out["type"] = "object"
    if out.get("type") == "object" and "properties" in out and "additionalProperties" in out and out["additionalProperties"] is False:
        out.pop("additionalProperties")
    # An integer-only bound on a "number" (e.g. epochs gt=0 le=1000) stays as is.
    return out


def model_schema(model: type[BaseModel]) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    resolved = _resolve(raw, defs)
    return _structural(resolved)


def _object_defaults(schema: dict[str, Any], model_cls: type[BaseModel]) -> None:
    """Give object-typed fields that use default_factory their default object, so the API server stores
    every effective setting (pydantic does not emit defaults for default_factory fields)."""
    for field_name, field in model_cls.model_fields.items():
        alias = field.alias or field_name
        sub = schema.get("properties", {}).get(alias)
        if sub is None:
            continue
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, spec._Model):
            if field.default_factory is not None:
                # the full default object, not {}: the API server validates a default (CEL rules
                # included) as written, before nested defaults would fill it in
                sub["default"] = field.get_default(call_default_factory=True).wire()
            _object_defaults(sub, ann)


def spec_schema() -> dict[str, Any]:
    schema = model_schema(spec.FineTuneJobSpec)
    _object_defaults(schema, spec.FineTuneJobSpec)
    return schema


def status_schema() -> dict[str, Any]:
    return model_schema(FineTuneJobStatus)


PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase", "description": "Lifecycle phase."},
    {"name": "Progress", "type": "string", "jsonPath": ".status.progress.text", "description": "Steps done/planned (percent)."},
    {"name": "Train-Loss", "type": "number", "jsonPath": ".status.progress.trainLoss", "description": "Latest training loss."},
    {"name": "Eval-Loss", "type": "number", "jsonPath": ".status.progress.evalLoss", "description": "Latest validation loss."},
    {"name": "Restarts", "type": "integer", "jsonPath": ".status.restarts", "description": "Group restarts after failures."},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def crd() -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{spec.PLURAL}.{spec.API_GROUP}"},
        "spec": {
            "group": spec.API_GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": spec.KIND,
                "listKind": f"{spec.KIND}List",
                "plural": spec.PLURAL,
                "singular": spec.SINGULAR,
                "shortNames": list(spec.SHORT_NAMES),
                "categories": ["all", "ml"],
            },
            "versions": [
                {
                    "name": spec.API_VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": (
                                "FineTuneJob fine-tunes a language model on a dataset in S3 with distributed GPU "
                                "training pods, and writes checkpoints, the final model and reports back to S3."
                            ),
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string", "description": "APIVersion of this object."},
                                "kind": {"type": "string", "description": "Kind of this object."},
                                "metadata": {"type": "object", "properties": {"name": spec.METADATA_NAME_SCHEMA}},
                                "spec": spec_schema(),
                                "status": status_schema(),
                            },
                        }
                    },
                }
            ],
        },
    }


HEADER = "# GENERATED by `make crds` (python -m finetune_api.crd) from operator/finetune_api/spec.py. Do not edit.\n"


def render() -> str:
    return HEADER + yaml.safe_dump(crd(), sort_keys=False, width=120)


if __name__ == "__main__":
    if sys.argv[1:] == ["--sweep"]:  # crds/finetune.io_finetunesweeps.yaml
        from finetune_api import sweep_crd

        sys.stdout.write(sweep_crd.render())
    else:
        sys.stdout.write(render())
