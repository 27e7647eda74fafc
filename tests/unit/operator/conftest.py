"""Fixtures for the operator's unit tests."""

import pytest

from finetune_operator import handlers
from finetune_operator.expectations import Expectations


@pytest.fixture(autouse=True)
def _fresh_expectations(monkeypatch):
    """Every test starts with no remembered writes (finetune_operator.expectations): the tests reuse uids."""
    monkeypatch.setattr(handlers, "_expected", Expectations())
