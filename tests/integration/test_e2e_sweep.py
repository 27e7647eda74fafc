"""End to end: a FineTuneSweep of the sentiment example on the local control plane, with real Optuna and real
trainings on the process node: trials created two at a time, the best one recorded, losing trials pruned,
the best parameters retrained as <sweep>-final, the dashboard's sweep row fed by a real Prometheus.

A grid over the learning rate, seeded so that the two good rates run first: the two tiny rates that follow
do not learn, so the median pruner stops them at their first checkpoint. The operator is killed and
restarted between the two halves. The trials log to a real MLflow server, nested under one parent run of the sweep.
"""

from __future__ import annotations

import hashlib
import json
import time

import pytest
import yaml

from finetune_api.sweep import ANNOTATION_PARAMS, LABEL_SWEEP, LABEL_TRIAL
from finetune_devcluster.procnode import NODE_LABEL, TAINT_KEY
from tests.integration.conftest import ROOT
from tests.integration.kubeutil import wait_for
from tests.integration.test_e2e_training import BUCKET, data, procnode, prometheus, secret  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.cluster, pytest.mark.s3, pytest.mark.slow]
GOOD, BAD = (0.003, 0.002), (2e-06, 1e-06)
FINAL_STEPS = 10  # the retraining's own schedule (final.overrides), shorter than the trials' 30 to keep the test short


def sweep_manifest(name: str, namespace: str, s3, mlflow_uri: str | None = None) -> dict:
    manifest = yaml.safe_load((ROOT / "examples" / "sweeps" / "sentiment-sweep.yaml").read_text())
    text = json.dumps(manifest).replace("s3://finetune-demo/", f"s3://{BUCKET}/")
    manifest = json.loads(text)
    manifest["metadata"] = {"name": name, "namespace": namespace}
    spec = manifest["spec"]
    spec.update(
        maxTrials=4, parallelism=2,
        search={"algorithm": "grid", "seed": 4},  # grid order: 0.003, 0.002, then the two tiny rates
        pruning={"type": "median", "startupTrials": 2},
        searchSpace=[{"path": "hyperparameters.learningRate", "type": "choice", "values": [*GOOD, *BAD]}],
        final={"action": "retrain", "overrides": {"hyperparameters": {"maxSteps": FINAL_STEPS}}},
    )
    template = spec["template"]
    template["output"]["uri"] = f"s3://{BUCKET}/runs/{namespace}/{name}"
    template["storage"]["endpoint"] = s3.endpoint_url
    template["dataset"]["preprocessing"] = {"dedupe": {"exact": True, "near": False}}
    template["hyperparameters"].update(maxSteps=30, warmupRatio=0.0)
    template["evaluation"]["baseline"] = True  # each trial's status.gain (test split): the sweep reports the winner's
    template["resources"].update(nodeSelector={NODE_LABEL: "process"}, tolerations=[{"key": TAINT_KEY, "operator": "Exists"}])
    if mlflow_uri:
        template.setdefault("tracking", {})["mlflow"] = {"uri": mlflow_uri, "experiment": f"sweep-{namespace}"}
    return manifest


def test_sweep_runs_trials_records_the_best_prunes_losers_and_retrains_the_best(kubectl, operator, procnode, s3, data,  # noqa: F811
                                                                               namespace, prometheus, mlflow_server):  # noqa: F811
    start = time.time()
    secret(kubectl, namespace, s3)
    wait_for("ftsweep short name", lambda: kubectl.run("get", "ftsweep", "-n", namespace, check=False).returncode == 0, timeout=30)
    kubectl.create(sweep_manifest("sw", namespace, s3, mlflow_server.url))

    def sweep_status() -> dict:
        return (kubectl.get("ftsweep", "sw", namespace) or {}).get("status") or {}

    # the operator dies once the first two trials are done: the one that starts again has only the objects
    # to go on, and must neither repeat a trial nor lose the ones recorded
    wait_for("two trials complete", lambda: sweep_status().get("completed") == 2, timeout=300)
    operator.kill()
    operator.start()

    def finished():
        st = sweep_status()
        if st.get("phase") == "Failed":
            raise RuntimeError(f"sweep failed: {st.get('message')}")
        return st.get("phase") == "Succeeded" and st

    st = wait_for("sweep Succeeded", finished, timeout=400)
    jobs = {j["metadata"]["name"]: j for j in kubectl.items("ftj", namespace)}
    final = jobs.pop("sw-final")
    assert sorted(jobs) == ["sw-t0", "sw-t1", "sw-t2", "sw-t3"]
    for job in [*jobs.values(), final]:
        assert job["metadata"]["labels"][LABEL_SWEEP] == "sw"
        assert job["metadata"]["ownerReferences"][0]["kind"] == "FineTuneSweep"
    tried = sorted(json.loads(j["metadata"]["annotations"][ANNOTATION_PARAMS])["hyperparameters.learningRate"] for j in jobs.values())
    assert tried == sorted([*GOOD, *BAD])
    assert len(st["trials"]) == 4 and st["progress"] == "4/4" and st["completed"] + st["pruned"] == 4

    # the best recorded is the best child's, and one of the good rates
    best = jobs[st["bestTrial"]]
    assert st["bestParams"] == json.loads(best["metadata"]["annotations"][ANNOTATION_PARAMS])
    assert st["bestParams"]["hyperparameters.learningRate"] in GOOD
    assert st["bestValue"] == best["status"]["progress"]["bestMetric"]
    assert st["bestModelUri"] == best["status"]["modelUri"]
    complete = [r for r in st["trials"] if r["state"] == "Complete"]
    assert st["bestValue"] == min(r["value"] for r in complete)

    # the tiny rates were pruned: their jobs are suspended, not finished
    pruned = [r for r in st["trials"] if r["state"] == "Pruned"]
    assert pruned, f"no trial was pruned: {[(r['name'], r['state'], r.get('intermediate')) for r in st['trials']]}"
    for rec in pruned:
        assert rec["params"]["hyperparameters.learningRate"] in BAD
        assert jobs[rec["name"]]["spec"]["runPolicy"]["suspend"] is True
        wait_for(f"{rec['name']} Suspended", lambda: (kubectl.get("ftj", rec["name"], namespace) or {}).get("status", {}).get("phase") == "Suspended", timeout=60)

    # the final step retrained the best trial's parameters with its own schedule; its model is the sweep's
    assert st["final"]["fromTrial"] == st["bestTrial"] and st["final"]["params"] == st["bestParams"]
    assert json.loads(final["metadata"]["annotations"][ANNOTATION_PARAMS]) == st["bestParams"]
    assert final["spec"]["hyperparameters"]["learningRate"] == st["bestParams"]["hyperparameters.learningRate"]
    assert final["spec"]["hyperparameters"]["maxSteps"] == FINAL_STEPS
    assert final["status"]["phase"] == "Succeeded" and final["status"]["progress"]["step"] == FINAL_STEPS
    assert st["modelUri"] == final["status"]["modelUri"] == st["final"]["modelUri"] != st["bestModelUri"]
    assert st["modelUri"].startswith(f"s3://{BUCKET}/runs/{namespace}/sw/sw-final/")
    # the winner's honest estimate: its gain on the test split, which took no part in choosing it
    assert st["bestGain"] == best["status"]["gain"] and st["bestGain"]["split"] == "test"

    reasons = [e["reason"] for e in kubectl.items("events", namespace) if e.get("involvedObject", {}).get("kind") == "FineTuneSweep"]
    assert reasons.count("TrialCreated") == 4 and "TrialPruned" in reasons and "SweepSucceeded" in reasons
    assert "FinalRetrainCreated" in reasons and "FinalRetrainSucceeded" in reasons

    # the dashboard's sweep row, queried on a real Prometheus scraping the operator
    dashboard = json.loads((ROOT / "charts" / "finetune-operator" / "dashboards" / "finetune-operator.json").read_text())
    row = [p for p in dashboard["panels"] if p["title"].startswith("Sweep")]
    assert len(row) == 2
    time.sleep(3)
    for panel in row:
        series = wait_for(panel["title"], lambda: prometheus.query_range(panel["targets"][0]["expr"], start, time.time()), timeout=30)
        assert any(s["metric"].get("sweep") == "sw" for s in series)
    best_value = prometheus.query_range(f'max by (sweep) (finetune_operator_sweep_best_value{{sweep="sw", namespace="{namespace}"}})', start, time.time())
    assert abs(float(best_value[0]["values"][-1][1]) - st["bestValue"]) < 1e-9

    # MLflow: one parent run for the sweep (the trainer found or created it; the operator only passed the sweep's
    # name, uid and trial number), every trial's run nested under it, each completed trial's value logged into it
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server.url)
    experiment_id = client.get_experiment_by_name(f"sweep-{namespace}").experiment_id
    sweep_uid = kubectl.get("ftsweep", "sw", namespace)["metadata"]["uid"]
    key = hashlib.sha256(sweep_uid.encode()).hexdigest()[:32]
    (parent,) = client.search_runs([experiment_id], filter_string=f"tags.`finetune.sweepKey` = '{key}'")
    assert (parent.info.run_name, parent.data.tags["finetune.sweep"]) == ("sw", "sw")
    jobs = {j["metadata"]["name"]: j for j in kubectl.items("ftj", namespace) if LABEL_TRIAL in j["metadata"]["labels"]}
    assert len(jobs) == 4  # the trials (sw-final is no trial: its run is not nested)
    for job in jobs.values():
        run = client.get_run(job["status"]["tracking"]["mlflowRunId"])
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id, job["metadata"]["name"]
        assert run.info.run_name == job["metadata"]["name"]
    children = client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(r.info.run_name for r in children) == sorted(jobs)
    logged = {m.step: m.value for m in client.get_metric_history(parent.info.run_id, "trial/eval_loss")}
    # the trainer's full value; the sweep's status holds it to 4 significant digits
    expected = {int(jobs[r["name"]]["metadata"]["labels"][LABEL_TRIAL]): r["value"] for r in complete}
    assert sorted(logged) == sorted(expected) and all(logged[n] == pytest.approx(v, rel=1e-3) for n, v in expected.items()), (logged, expected)
