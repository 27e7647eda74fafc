"""dataset.crossValidation in the status: the trainer's fold and summary projected from progress.json, and the
fold cleared from status.progress once the refit starts (the merge patch nulls keys one level down)."""

from __future__ import annotations

from finetune_api.documents import ProgressDocument
from finetune_api.status import FineTuneJobStatus
from finetune_operator.handlers import _status_patch
from finetune_operator.progress import project

SUMMARY = {"folds": 3, "stratified": True, "currentFold": 3,
           "results": [{"fold": 1, "trainRows": 8, "validationRows": 4, "steps": 2, "metrics": {"accuracy": 0.75, "eval_loss": 0.61234567}},
                       {"fold": 2, "trainRows": 8, "validationRows": 4, "steps": 2, "metrics": {"accuracy": 0.5, "eval_loss": 0.7}}],
           "mean": {"accuracy": 0.625, "eval_loss": 0.65617283}, "std": {"accuracy": 0.125, "eval_loss": 0.04382717}}


def test_fold_and_summary_reach_the_status_at_full_precision():
    status = project(ProgressDocument.model_validate({"stage": "training", "step": 1, "totalSteps": 2, "fold": 3, "crossValidation": SUMMARY}))
    assert status["progress"]["fold"] == 3
    cv = status["crossValidation"]
    assert cv["mean"] == {"accuracy": 0.625, "eval_loss": 0.65617283} and cv["results"][0]["metrics"]["eval_loss"] == 0.61234567
    assert cv["currentFold"] == 3 and cv["finalModel"] == "refit"
    FineTuneJobStatus.model_validate(status)  # the CRD's status schema holds it


def test_the_refit_clears_the_fold_from_the_status():
    during = project(ProgressDocument.model_validate({"stage": "training", "step": 2, "totalSteps": 2, "fold": 3, "crossValidation": SUMMARY}))
    refit = project(ProgressDocument.model_validate({"stage": "training", "step": 1, "totalSteps": 4,
                                                     "crossValidation": {**SUMMARY, "currentFold": None}}))
    patch = _status_patch(during, refit)
    assert patch["progress"]["fold"] is None and patch["progress"]["step"] == 1
    assert patch["crossValidation"]["currentFold"] is None
    assert _status_patch(refit, refit) == {}  # nothing to write once it is stored
