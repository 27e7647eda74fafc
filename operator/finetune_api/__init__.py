"""The FineTuneJob API shared by the operator and the trainer: spec, status, progress document, CRD."""

from finetune_api.spec import API_GROUP, API_VERSION, KIND, PLURAL, FineTuneJobSpec, parse_spec

__all__ = ["API_GROUP", "API_VERSION", "KIND", "PLURAL", "FineTuneJobSpec", "parse_spec"]
