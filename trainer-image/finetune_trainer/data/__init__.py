"""The trainer's data pipeline, one module per stage, in the order the data flows:

``readers`` (files -> rows) -> ``formats`` (rows -> records) -> ``cleaning`` + ``pii`` (normalise, redact,
dedupe) -> ``tokenize`` -> ``splits`` -> ``leakage`` -> ``labels`` (label set, class balance) ->
``report``. ``staging`` streams one input through the first stages into an Arrow file; ``prepare`` runs them: :func:`prepare_data` is the entry point the training loop calls.
"""

from finetune_trainer.data.prepare import PreparedData, prepare_data
from finetune_trainer.data.report import format_report

__all__ = ["PreparedData", "prepare_data", "format_report"]
