"""End to end: examples/preference-dpo.yaml through the operator on the local control plane, the trainer running
as a process on the process node: DPO on preference pairs, its pair metrics in the status and the model card."""

from __future__ import annotations

import os

import pytest

from tests.integration.conftest import ROOT
from tests.integration.test_e2e_training import BUCKET, data, example, keys, procnode, read_json, secret  # noqa: F401 (fixtures)
from tests.integration.test_operator import wait_phase

pytestmark = [pytest.mark.cluster, pytest.mark.s3, pytest.mark.slow]
# The process node runs pods with the pod's env only: point the trainer at this checkout's code.
THIS_CODE = {"env": [{"name": "PYTHONPATH", "value": os.pathsep.join(str(ROOT / d) for d in ("operator", "trainer-image"))}]}


def test_dpo_example_trains_and_reports_reward_accuracy_over_the_base_models_preference(kubectl, operator, procnode, s3, data, namespace):  # noqa: F811
    secret(kubectl, namespace, s3)
    manifest = example("preference-dpo.yaml", "dpo", namespace, s3)
    manifest["spec"]["resources"].update(THIS_CODE)
    kubectl.create(manifest)
    st = wait_phase(kubectl, namespace, "dpo", "Succeeded", timeout=300)
    assert st["progress"]["step"] == st["progress"]["totalSteps"] == 24 and st["progress"]["stage"] == "done"
    # The headline gain: the tuned model's own preference (mean token log-prob, chosen vs rejected) over the base model's, on test.
    assert st["gain"]["metric"] == "logp_accuracy" and st["gain"]["split"] == "test"
    assert st["gain"]["final"] > st["gain"]["baseline"]
    assert st["progress"]["bestMetricName"] == "reward_accuracy" and st["progress"]["bestMetric"] >= 0.75
    run = f"runs/{namespace}/dpo"
    progress = read_json(s3, f"{run}/progress.json")
    base, test = progress["evaluation"]["baseline"]["base_model"], progress["evaluation"]["test"]
    print("measured: base model", base, "test", test, "gain", st["gain"], "best", st["progress"]["bestMetric"])
    assert test["reward_accuracy"] >= base["logp_accuracy"] + 0.2 and test["reward_margin"] > 0
    card = read_json(s3, f"{run}/model/model_card.json")
    assert card["objective"] == {"type": "dpo", "beta": 0.3}
    assert card["evaluation"]["test"]["reward_accuracy"] == test["reward_accuracy"]
    assert card["evaluation"]["baselines"]["base_model"]["logp_accuracy"] == base["logp_accuracy"]
    assert f"{run}/model/adapter_model.safetensors" in keys(s3, f"{run}/model/")
    report = read_json(s3, f"{run}/data-report.json")
    assert report["format"] == "preference" and report["leakage"]["key"] == "prompt"
