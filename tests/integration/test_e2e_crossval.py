"""End to end: examples/cv/sentiment-cv.yaml (dataset.crossValidation, 3 folds) through the operator on the local
control plane, the trainer running as a process on the process node: the status shows the fold training now, then
every fold's validation metrics with their mean and standard deviation, and the refit's test metrics."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from tests.integration.conftest import ROOT
from tests.integration.test_e2e_training import BUCKET, data, example, keys, procnode, read_json, secret  # noqa: F401 (fixtures)
from tests.integration.test_operator import status, wait_phase

pytestmark = [pytest.mark.cluster, pytest.mark.s3, pytest.mark.slow]
# The process node runs pods with the pod's env only: point the trainer at this checkout's code.
THIS_CODE = {"env": [{"name": "PYTHONPATH", "value": os.pathsep.join(str(ROOT / d) for d in ("operator", "trainer-image"))}]}


def test_three_fold_cross_validation_reports_each_fold_and_mean_std(kubectl, operator, procnode, s3, data, namespace):  # noqa: F811
    secret(kubectl, namespace, s3)
    manifest = example("cv/sentiment-cv.yaml", "sentiment-cv", namespace, s3)
    manifest["spec"]["resources"].update(THIS_CODE)
    started = time.monotonic()
    kubectl.create(manifest)
    seen_folds: set[int] = set()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # the fold training now, as the status shows it while the job runs
        st = status(kubectl, namespace, "sentiment-cv")
        if st.get("progress", {}).get("fold"):
            seen_folds.add(st["progress"]["fold"])
        if st.get("phase") in ("Succeeded", "Failed"):
            break
        time.sleep(0.5)
    st = wait_phase(kubectl, namespace, "sentiment-cv", "Succeeded", timeout=10)
    elapsed = time.monotonic() - started
    cv = st["crossValidation"]
    print("measured:", f"{elapsed:.0f}s", "folds seen", sorted(seen_folds), "mean", cv["mean"], "std", cv["std"], "test", st["gain"])
    assert seen_folds and seen_folds <= {1, 2, 3}
    assert "fold" not in st["progress"] and "currentFold" not in cv and st["progress"]["stage"] == "done"
    assert cv["folds"] == 3 and cv["stratified"] is True and [r["fold"] for r in cv["results"]] == [1, 2, 3]
    for name in ("accuracy", "eval_loss"):
        values = [r["metrics"][name] for r in cv["results"]]
        assert cv["mean"][name] == pytest.approx(np.mean(values), rel=1e-12) and cv["std"][name] == pytest.approx(np.std(values), rel=1e-12)
    assert cv["mean"]["accuracy"] >= 0.8 and cv["std"]["eval_loss"] > 0
    run = f"runs/{namespace}/sentiment-cv"
    report = read_json(s3, f"{run}/data-report.json")
    pool = report["final_sizes"]["train"]
    assert report["final_sizes"]["validation"] is None and report["cross_validation"]["rows"] == pool
    assert all(r["trainRows"] + r["validationRows"] <= pool for r in cv["results"])
    # The refit is the exported model, tested on the test split (in no fold); the card carries the same summary.
    assert st["gain"]["split"] == "test" and st["gain"]["final"] > st["gain"]["baseline"]
    assert st["modelUri"] == f"s3://{BUCKET}/{run}/model" and st["latestCheckpoint"].startswith(f"s3://{BUCKET}/{run}/checkpoints/step-")
    for k in (1, 2, 3):
        assert any("/manifest.json" in key for key in keys(s3, f"{run}/cross-validation/fold-{k}/checkpoints/"))
    card = read_json(s3, f"{run}/model/model_card.json")
    assert card["crossValidation"]["mean"] == cv["mean"] and card["crossValidation"]["results"] == cv["results"]
