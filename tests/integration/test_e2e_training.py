"""End to end: kubectl apply -> the operator's real pod spec runs the real trainer (as local processes on
the process node) -> a fine-tuned model in MinIO, with progress, data report and gain in the status.

The FineTuneJobs are the ones in examples/, pointed at this test's S3 server and pinned to the
(tainted) process node so that no kwok node fakes them.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import time
from pathlib import Path

import psutil
import pytest
import yaml

from finetune_devcluster.assets import seed_bucket
from finetune_devcluster.procnode import NODE_LABEL, TAINT_KEY, ProcessNode
from tests.integration.conftest import ROOT
from tests.integration.kubeutil import wait_for
from tests.integration.test_operator import events_for, pods_of, status, wait_phase

pytestmark = [pytest.mark.cluster, pytest.mark.s3, pytest.mark.slow]
BUCKET = "e2e"


@pytest.fixture(scope="module")
def procnode(cluster, tmp_path_factory):
    work = tmp_path_factory.mktemp("procnode")
    # The pods import the trainer the tests import: a PYTHONPATH set for this run (a worktree's code) reaches them too.
    passed = {"PYTHONPATH": os.environ["PYTHONPATH"]} if os.environ.get("PYTHONPATH") else {}
    node = ProcessNode(cluster.api_client(), name="e2e-proc-0", workdir=work, taint=True, targets_file=work / "targets.json",
                       extra_env={"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", **passed}).start()

    def ready():
        conditions = json.loads(cluster.kubectl("get", "node", node.name, "-o", "json").stdout)["status"]["conditions"]
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

    wait_for("process node Ready", ready, timeout=30)
    yield node
    node.stop()
    cluster.kubectl("delete", "node", node.name, check=False)


@pytest.fixture(scope="module")
def data(s3, tmp_path_factory):
    return seed_bucket(s3.client(), BUCKET, tmp_path_factory.mktemp("assets"))


def example(file: str, name: str, namespace: str, s3, **overrides) -> dict:
    manifest = yaml.safe_load((ROOT / "examples" / file).read_text())
    text = json.dumps(manifest).replace("s3://finetune-demo/runs/", f"s3://{BUCKET}/runs/{namespace}/").replace("s3://finetune-demo/", f"s3://{BUCKET}/")
    manifest = json.loads(text)
    manifest["metadata"] = {"name": name, "namespace": namespace}
    spec = manifest["spec"]
    spec["output"]["uri"] = f"s3://{BUCKET}/runs/{namespace}/{name}"
    spec["storage"]["endpoint"] = s3.endpoint_url
    spec["resources"].update(nodeSelector={NODE_LABEL: "process"}, tolerations=[{"key": TAINT_KEY, "operator": "Exists"}])
    for key, value in overrides.items():
        spec[key] = {**spec.get(key, {}), **value} if isinstance(value, dict) else value
    return manifest


def secret(kubectl, namespace: str, s3, secret_key: str | None = None) -> None:
    kubectl.run("create", "secret", "generic", "s3-credentials", "-n", namespace,
                f"--from-literal=AWS_ACCESS_KEY_ID={s3.access_key}",
                f"--from-literal=AWS_SECRET_ACCESS_KEY={secret_key or s3.secret_key}")


def keys(s3, prefix: str) -> list[str]:
    out = s3.client().list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for o in out.get("Contents", [])]


def read_json(s3, key: str) -> dict:
    return json.loads(s3.client().get_object(Bucket=BUCKET, Key=key)["Body"].read())


def test_classification_happy_path(kubectl, operator, procnode, s3, data, namespace):
    secret(kubectl, namespace, s3)
    kubectl.create(example("sentiment-classification.yaml", "sentiment", namespace, s3))
    st = wait_phase(kubectl, namespace, "sentiment", "Succeeded", timeout=600)
    run = f"runs/{namespace}/sentiment"
    # progress, model and reports made it back into the status...
    assert st["progress"]["step"] > 0 and st["progress"]["stage"] == "done"
    assert st["modelUri"] == f"s3://{BUCKET}/{run}/model"
    assert st["gain"]["metric"] == "accuracy" and st["gain"]["final"] > st["gain"]["baseline"] + 0.1
    assert st["data"]["exactDuplicates"] == 6 and st["data"]["piiRedacted"] == 3
    assert st["latestCheckpoint"].startswith(f"s3://{BUCKET}/{run}/checkpoints/step-")
    # ...and the objects are really in MinIO
    model = keys(s3, f"{run}/model/")
    assert f"{run}/model/adapter_model.safetensors" in model and f"{run}/model/model_card.json" in model
    report = read_json(s3, f"{run}/data-report.json")
    assert report["total"]["exact_duplicates"] == 6 and report["total"]["rows_read"] >= 400
    card = read_json(s3, f"{run}/model/model_card.json")
    assert json.dumps(card).count("accuracy") >= 2
    reasons = {e["reason"] for e in events_for(kubectl, namespace, "sentiment")}
    assert {"JobCreated", "PodsRunning", "Completed"} <= reasons


def test_distilled_student_waits_for_its_teacher_job_and_learns_from_its_model(kubectl, operator, procnode, s3, data, namespace):
    """examples/distillation/ through the operator, the student before its teacher: the student (teacher.fromJob)
    waits for the teacher job, then downloads the model that job exported and reports it beside itself (a short teacher run: this
    checks the wiring; the gain from a well-trained teacher is tests/unit/trainer/test_distill.py's)."""
    secret(kubectl, namespace, s3)
    short = {"hyperparameters": {"maxSteps": 4}, "evaluation": {"everySteps": 100, "baseline": False}}
    # The student first (kubectl apply -f examples/distillation/ creates it first too): it waits for a teacher job that
    # does not exist yet, then for it to finish.
    kubectl.create(example("distillation/sentiment-student.yaml", "distilled", namespace, s3,
                           hyperparameters={"maxSteps": 6}, evaluation={"everySteps": 100, "baseline": False}))
    wait_for("the student waits for a teacher job that does not exist yet",
             lambda: (s := status(kubectl, namespace, "distilled")).get("reason") == "ParentJobNotFound" and s.get("phase") == "Pending",
             timeout=60, interval=0.5)
    kubectl.create(example("distillation/sentiment-teacher.yaml", "sentiment-teacher", namespace, s3, **short))
    teacher = wait_phase(kubectl, namespace, "sentiment-teacher", "Succeeded", timeout=600)
    st = wait_phase(kubectl, namespace, "distilled", "Succeeded", timeout=600)
    assert st["teacherUri"] == teacher["modelUri"] == f"s3://{BUCKET}/runs/{namespace}/sentiment-teacher/model"
    assert st["progress"]["step"] == 6
    run = f"runs/{namespace}/distilled"
    evaluation = read_json(s3, f"{run}/progress.json")["evaluation"]
    measured = evaluation["teacher"]
    assert measured["uri"] == teacher["modelUri"] and measured["alpha"] == 0.5
    assert measured["test"]["eval_samples"] == evaluation["test"]["eval_samples"] > 0
    card = read_json(s3, f"{run}/model/model_card.json")
    assert card["evaluation"]["teacher"]["test"]["accuracy"] == measured["test"]["accuracy"]


def test_two_node_causal_lm_forms_one_distributed_group(kubectl, operator, procnode, s3, data, namespace):
    secret(kubectl, namespace, s3)
    kubectl.create(example("instruction-tuning-2-nodes.yaml", "lm2", namespace, s3))
    st = wait_phase(kubectl, namespace, "lm2", "Succeeded", timeout=600)
    pods = pods_of(kubectl, namespace, "lm2", 0)
    assert len(pods) == 2 and all(p["status"]["phase"] == "Succeeded" for p in pods)
    assert all(p["spec"]["nodeName"] == procnode.name for p in pods)
    assert st["progress"]["step"] == st["progress"]["totalSteps"] == 40
    assert st["gain"]["final"] < st["gain"]["baseline"]  # eval loss went down
    manifest = read_json(s3, st["latestCheckpoint"].removeprefix(f"s3://{BUCKET}/") + "/manifest.json")
    assert manifest["world_size"] == 2 and manifest["step"] == 40  # one group of two ranks
    assert all(f["size"] > 0 and len(f["sha256"]) == 64 for f in manifest["files"].values())


def test_seq2seq_summaries_beat_the_base_model(kubectl, operator, procnode, s3, data, namespace):
    """examples/summarise-seq2seq.yaml: a tiny BART learns to summarise; ROUGE-L on test rises from the base model's."""
    secret(kubectl, namespace, s3)
    kubectl.create(example("summarise-seq2seq.yaml", "summarise", namespace, s3))
    st = wait_phase(kubectl, namespace, "summarise", "Succeeded", timeout=600)
    run = f"runs/{namespace}/summarise"
    assert st["progress"]["stage"] == "done" and st["progress"]["step"] > 0
    gain = st["gain"]
    assert (gain["metric"], gain["split"], gain["baselineKind"]) == ("rouge_l", "test", "base_model")
    assert gain["final"] > gain["baseline"] + 0.5
    progress = read_json(s3, f"{run}/progress.json")
    test, start = progress["evaluation"]["test"], progress["evaluation"]["baseline"]["base_model"]
    assert all(test[m] > start[m] for m in ("rouge_1", "rouge_2", "rouge_l", "bleu"))
    card = read_json(s3, f"{run}/model/model_card.json")
    assert card["task"] == "seq2seq-lm"
    assert f"{run}/model/model.safetensors" in keys(s3, f"{run}/model/")


def test_two_node_full_fine_tune_is_sharded_with_fsdp(kubectl, operator, procnode, s3, data, namespace):
    secret(kubectl, namespace, s3)
    kubectl.create(example("full-fine-tune-fsdp.yaml", "fsdp", namespace, s3))
    st = wait_phase(kubectl, namespace, "fsdp", "Succeeded", timeout=600)
    assert st["progress"]["step"] == st["progress"]["totalSteps"] == 20
    assert st["gain"]["final"] < st["gain"]["baseline"]  # eval loss went down
    run = f"runs/{namespace}/fsdp"
    manifest = read_json(s3, st["latestCheckpoint"].removeprefix(f"s3://{BUCKET}/") + "/manifest.json")
    assert manifest["world_size"] == 2 and "model.safetensors" in manifest["files"]  # full weights, gathered to rank 0
    card = read_json(s3, f"{run}/model/model_card.json")
    assert '"distributed_strategy": "fsdp"' in json.dumps(card)
    assert f"{run}/model/model.safetensors" in keys(s3, f"{run}/model/")


def test_killed_trainer_resumes_from_checkpoint_with_continuous_steps(kubectl, operator, procnode, s3, data, namespace):
    secret(kubectl, namespace, s3)
    kubectl.create(example("sentiment-classification.yaml", "killed", namespace, s3,
                           hyperparameters={"epochs": 4}, evaluation={"earlyStopping": None}))
    run = f"runs/{namespace}/killed"
    wait_for("first checkpoint", lambda: f"{run}/checkpoints/step-00000010/manifest.json" in keys(s3, f"{run}/checkpoints/"), timeout=600, interval=0.5)
    (pod,) = [p for p in pods_of(kubectl, namespace, "killed", 0)]
    leader = procnode.pid_of(namespace, pod["metadata"]["name"])
    workers = [c for c in psutil.Process(leader).children(recursive=True) if "finetune_trainer" in " ".join(c.cmdline())]
    assert workers, "no trainer process under torchrun"
    for w in workers:
        os.kill(w.pid, signal.SIGKILL)
    st = wait_for("restart", lambda: (s := status(kubectl, namespace, "killed")).get("restarts") == 1 and s, timeout=120)
    assert st["attempt"] == 1
    st = wait_phase(kubectl, namespace, "killed", "Succeeded", timeout=600)
    assert st["restarts"] == 1
    final = read_json(s3, st["latestCheckpoint"].removeprefix(f"s3://{BUCKET}/") + "/trainer_state.json")
    steps = [h["step"] for h in final["history"]]
    assert steps == list(range(1, final["step"] + 1))  # resumed at the next step: no gap, no repeat


def test_missing_dataset_fails_with_the_trainers_reason(kubectl, operator, procnode, s3, data, namespace):
    secret(kubectl, namespace, s3)
    kubectl.create(example("sentiment-classification.yaml", "nodata", namespace, s3,
                           dataset={"train": f"s3://{BUCKET}/datasets/nope/train.jsonl"}))
    st = wait_phase(kubectl, namespace, "nodata", "Failed", timeout=300)
    assert st["reason"] == "DatasetNotFound"
    assert "datasets/nope/train.jsonl" in st["message"] and st["restarts"] == 0


def test_wrong_s3_credentials_fail_with_a_clear_reason(kubectl, operator, procnode, s3, data, namespace):
    secret(kubectl, namespace, s3, secret_key="not-the-secret")
    kubectl.create(example("sentiment-classification.yaml", "badcreds", namespace, s3))
    st = wait_phase(kubectl, namespace, "badcreds", "Failed", timeout=300)
    assert st["reason"] == "S3AuthError"
    assert "not-the-secret" not in json.dumps(kubectl.get("ftj", "badcreds", namespace))
    assert st["restarts"] == 0


def _wait_checkpoint(s3, run: str, step: int = 10) -> None:
    wait_for(f"checkpoint {step}", lambda: f"{run}/checkpoints/step-{step:08d}/manifest.json" in keys(s3, f"{run}/checkpoints/"),
             timeout=600, interval=0.5)


def _continuous(s3, st: dict) -> list[int]:
    final = read_json(s3, st["latestCheckpoint"].removeprefix(f"s3://{BUCKET}/") + "/trainer_state.json")
    steps = [h["step"] for h in final["history"]]
    assert steps == list(range(1, final["step"] + 1)), steps
    return steps


def test_deleted_pod_restarts_the_group_and_resumes(kubectl, operator, procnode, s3, data, namespace):
    secret(kubectl, namespace, s3)
    kubectl.create(example("sentiment-classification.yaml", "podgone", namespace, s3,
                           hyperparameters={"epochs": 4}, evaluation={"earlyStopping": None}))
    _wait_checkpoint(s3, f"runs/{namespace}/podgone")
    (pod,) = pods_of(kubectl, namespace, "podgone", 0)
    kubectl.run("delete", "pod", pod["metadata"]["name"], "-n", namespace, "--wait=false")
    st = wait_for("restart", lambda: (s := status(kubectl, namespace, "podgone")).get("restarts") == 1 and s, timeout=120)
    st = wait_phase(kubectl, namespace, "podgone", "Succeeded", timeout=600)
    assert st["restarts"] == 1 and st["attempt"] == 1
    _continuous(s3, st)


def test_suspend_mid_training_checkpoints_and_resume_continues(kubectl, operator, procnode, s3, data, namespace):
    secret(kubectl, namespace, s3)
    kubectl.create(example("sentiment-classification.yaml", "paused", namespace, s3,
                           hyperparameters={"epochs": 4}, evaluation={"earlyStopping": None}))
    run = f"runs/{namespace}/paused"
    _wait_checkpoint(s3, run)
    kubectl.run("patch", "ftj", "paused", "-n", namespace, "--type=merge", "-p", '{"spec":{"runPolicy":{"suspend":true}}}')
    wait_phase(kubectl, namespace, "paused", "Suspended")
    wait_for("pods gone", lambda: pods_of(kubectl, namespace, "paused") == [], timeout=120)
    # SIGTERM made the trainer checkpoint at the step it was on, not only at the every-10 marks
    progress = read_json(s3, f"{run}/progress.json")
    assert progress["stage"] == "preempted"
    kubectl.run("patch", "ftj", "paused", "-n", namespace, "--type=merge", "-p", '{"spec":{"runPolicy":{"suspend":false}}}')
    st = wait_phase(kubectl, namespace, "paused", "Succeeded", timeout=600)
    assert st["restarts"] == 0
    _continuous(s3, st)


def test_operator_restarted_during_training_keeps_status_updating(kubectl, operator, procnode, s3, data, namespace):
    secret(kubectl, namespace, s3)
    kubectl.create(example("sentiment-classification.yaml", "opgone", namespace, s3,
                           hyperparameters={"epochs": 4}, evaluation={"earlyStopping": None}))
    _wait_checkpoint(s3, f"runs/{namespace}/opgone")
    operator.kill()
    try:
        time.sleep(3)
    finally:
        operator.start()
    before = status(kubectl, namespace, "opgone").get("progress", {}).get("step", 0)
    st = wait_phase(kubectl, namespace, "opgone", "Succeeded", timeout=600)
    assert st["progress"]["step"] > before and st["progress"]["stage"] == "done"
    assert st["restarts"] == 0
    assert len(kubectl.items("jobs", namespace)) == 1


@pytest.fixture(scope="module")
def prometheus(procnode, operator, tmp_path_factory):
    from finetune_devcluster.prometheus import LocalPrometheus

    prom = LocalPrometheus(str(procnode.targets_file), [f"127.0.0.1:{operator.port}"], tmp_path_factory.mktemp("prometheus")).start()
    yield prom
    prom.stop()


def test_every_dashboard_panel_query_returns_data(kubectl, operator, procnode, s3, data, namespace, prometheus):
    dashboard = json.loads((ROOT / "charts" / "finetune-operator" / "dashboards" / "finetune-operator.json").read_text())
    start = time.time()
    secret(kubectl, namespace, s3)
    kubectl.create(example("sentiment-classification.yaml", "watched", namespace, s3, evaluation={"earlyStopping": None}))
    # the trainer pod is discovered (file_sd kept by the process node) and scraped while it trains
    wait_for("trainer target", lambda: any(t["labels"].get("pod", "").startswith("watched-0-") and t["health"] == "up"
                                           for t in prometheus.targets()), timeout=300)
    wait_phase(kubectl, namespace, "watched", "Succeeded", timeout=600)
    time.sleep(3)
    empty = []
    for panel in dashboard["panels"]:
        if panel["title"].startswith("Sweep"):  # the sweep row: tests/integration/test_e2e_sweep.py
            continue
        for target in panel["targets"]:
            if not prometheus.query_range(target["expr"], start, time.time()):
                empty.append(f'{panel["title"]}: {target["expr"]}')
    assert empty == []
    loss = prometheus.query_range('max by (job) (finetune_train_loss{rank="0", job="watched"})', start, time.time())
    assert loss and all(float(v) > 0 for _, v in loss[0]["values"])
