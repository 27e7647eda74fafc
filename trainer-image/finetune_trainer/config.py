"""Stage 0: read the job config.

The operator renders the FineTuneJob into a ConfigMap and mounts it as ``job.yaml``; run locally, the
same file can be a whole manifest (apiVersion/kind/metadata/spec) or just the spec. Either way it is
validated by :class:`FineTuneJobSpec`, the model the operator uses, so both reject bad input with the
same words.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from finetune_api.spec import KIND, FineTuneJobSpec
from finetune_api.validation import validation_message
from pydantic import ValidationError

from .errors import InvalidConfig


@dataclass(frozen=True)
class JobConfig:
    """The validated spec plus the job's name (used in metric labels, paths and the model card)."""

    name: str
    spec: FineTuneJobSpec

    @property
    def output_uri(self) -> str:
        return self.spec.output.uri.rstrip("/") or "/"


def parse_document(doc: Any, default_name: str) -> JobConfig:
    """Accept a FineTuneJob manifest or a bare spec dict."""
    if not isinstance(doc, dict):
        raise InvalidConfig(f"the job config must be a mapping, got {type(doc).__name__}")
    name = default_name
    if "spec" in doc and ("kind" in doc or "apiVersion" in doc or "metadata" in doc):
        if doc.get("kind", KIND) != KIND:
            raise InvalidConfig(f"kind is {doc.get('kind')!r}, expected {KIND}")
        name = str((doc.get("metadata") or {}).get("name") or default_name)
        doc = doc["spec"]
        if not isinstance(doc, dict):
            raise InvalidConfig("spec must be a mapping")
    try:
        spec = FineTuneJobSpec.model_validate(doc)
    except ValidationError as e:
        raise InvalidConfig(validation_message(e)) from None
    return JobConfig(name=name, spec=spec)


def load_config(path: str | Path, *, output_override: str | None = None) -> JobConfig:
    """Read and validate ``path``; ``output_override`` replaces spec.output.uri (same validation)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise InvalidConfig(f"cannot read config {path}: {e.strerror or e}") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise InvalidConfig(f"{path} is not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    config = parse_document(doc, default_name=path.stem)
    if output_override:
        wire = config.spec.model_dump(by_alias=True, exclude_none=True, mode="json")
        wire["output"]["uri"] = output_override
        config = parse_document(wire, default_name=config.name)
    return config
