"""The FineTuneSweep decider with real Optuna: trial parameters, limits, restarts and pruning."""

from __future__ import annotations

import json
import math
from typing import Any

from finetune_api.sweep import ANNOTATION_PARAMS, LABEL_FINAL, LABEL_SWEEP, LABEL_TRIAL, parse_sweep
from finetune_operator.sweep import ObservedTrial, decide, observe_final, observe_trial

TEMPLATE = {
    "model": {"uri": "s3://models/tiny-llama"},
    "dataset": {"train": "s3://data/train.jsonl"},
    "output": {"uri": "s3://out/sw"},
    "resources": {"queueName": "team-a"},
}
LR = {"path": "hyperparameters.learningRate", "type": "log-uniform", "low": 1e-5, "high": 1e-2}
RANK = {"path": "lora.r", "type": "choice", "values": [4, 8, 16]}
UID = "uid-1"


def sweep(**extra: Any):
    return parse_sweep({"template": TEMPLATE, "searchSpace": [LR, RANK], **extra})


def loss(params: dict[str, Any]) -> float:
    """A made-up objective: best at learning rate 1e-3 and rank 8."""
    return abs(math.log10(params.get("hyperparameters.learningRate", 1e-3)) + 3) + abs(params.get("lora.r", 8) - 8) / 8


class World:
    """The trial FineTuneJobs a cluster would hold, driven by the plans."""

    def __init__(self) -> None:
        self.jobs: dict[str, dict[str, Any]] = {}
        self.status: dict[str, Any] | None = None

    def observed(self) -> list[ObservedTrial]:
        return [t for t in (observe_trial(b) for b in self.jobs.values()) if t is not None]

    def final(self) -> ObservedTrial | None:
        return next((f for f in (observe_final(b) for b in self.jobs.values()) if f is not None), None)

    def reconcile(self, spec, status: dict[str, Any] | None = "current", refused: str | None = None):
        plan = decide("sw", "ns", UID, spec, self.status if status == "current" else status, self.observed(),
                      final=self.final(), refused=refused)
        for body in plan.create:
            assert body["metadata"]["name"] not in self.jobs
            self.jobs[body["metadata"]["name"]] = {**body, "status": {"phase": "Running"}}
        for name in plan.suspend:
            self.jobs[name]["spec"]["runPolicy"]["suspend"] = True
        self.status = plan.status
        return plan

    def params(self, name: str) -> dict[str, Any]:
        return json.loads(self.jobs[name]["metadata"]["annotations"][ANNOTATION_PARAMS])

    def finish(self, name: str, value: float | None = None, phase: str = "Succeeded") -> None:
        value = loss(self.params(name)) if value is None else value
        self.jobs[name]["status"] = {
            "phase": phase,
            "progress": {"bestMetric": value, "bestMetricName": "eval_loss"},
            "modelUri": f"s3://out/sw/{name}/model",
            "checkpoints": [{"step": 10, "uri": "x", "metric": value + 0.5}, {"step": 20, "uri": "y", "metric": value}],
            "gain": {"metric": "eval_loss", "baseline": 9.0, "final": value + 0.01, "split": "test", "baselineKind": "base_model"},
        }

    def evaluate(self, name: str, step: int, value: float) -> None:
        status = self.jobs[name]["status"]
        status.setdefault("checkpoints", []).append({"step": step, "uri": f"s3://c/{step}", "metric": value})


def run_to_end(world: World, spec, rounds: int = 50, trials_only: bool = False) -> None:
    """Finish every running job round after round until the sweep ends (``trials_only``: until no trial runs)."""
    for _ in range(rounds):
        world.reconcile(spec)
        running = [n for n, j in world.jobs.items() if j["status"]["phase"] == "Running" and not j["spec"]["runPolicy"].get("suspend")
                   and (not trials_only or LABEL_TRIAL in j["metadata"]["labels"])]
        if not running and (trials_only or world.status["phase"] != "Running"):
            return
        for name in running:
            world.finish(name)
    raise AssertionError("the sweep did not end")


def test_children_are_owned_labelled_queued_and_parallelism_holds():
    world = World()
    plan = world.reconcile(sweep(parallelism=2, maxTrials=5))
    assert [b["metadata"]["name"] for b in plan.create] == ["sw-t0", "sw-t1"]
    child = plan.create[0]
    assert child["metadata"]["labels"] == {LABEL_SWEEP: "sw", LABEL_TRIAL: "0"}
    owner = child["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == ("FineTuneSweep", "sw", UID, True)
    assert child["spec"]["resources"]["queueName"] == "team-a"
    assert child["spec"]["output"]["uri"] == "s3://out/sw/sw-t0"
    params = world.params("sw-t0")
    assert child["spec"]["hyperparameters"]["learningRate"] == params["hyperparameters.learningRate"]
    assert child["spec"]["lora"]["r"] == params["lora.r"] in (4, 8, 16)
    assert 1e-5 <= params["hyperparameters.learningRate"] <= 1e-2
    assert world.status["running"] == 2 and world.status["progress"] == "0/5"
    # nothing finished: no new trial
    assert world.reconcile(sweep(parallelism=2, maxTrials=5)).create == []


def test_same_seed_same_trials_other_seed_other_trials():
    def first_params(seed: int) -> list[dict[str, Any]]:
        world = World()
        spec = sweep(parallelism=3, maxTrials=3, search={"algorithm": "tpe", "seed": seed})
        world.reconcile(spec)
        return [world.params(n) for n in sorted(world.jobs)]

    assert first_params(7) == first_params(7)
    assert first_params(7) != first_params(8)


def test_max_trials_reached_best_recorded():
    world = World()
    spec = sweep(parallelism=2, maxTrials=6, search={"algorithm": "random", "seed": 3})
    run_to_end(world, spec)
    status = world.status
    assert status["phase"] == "Succeeded"
    assert len(world.jobs) == 6 and status["completed"] == 6 and status["progress"] == "6/6"
    tried = [json.dumps(world.params(n), sort_keys=True) for n in world.jobs]
    assert len(set(tried)) == 6, "a later reconcile proposed an earlier trial's parameters again"
    values = {r["name"]: r["value"] for r in status["trials"]}
    best = min(values, key=values.get)
    assert status["bestTrial"] == best and status["bestValue"] == values[best]
    assert status["bestParams"] == world.params(best)
    assert status["bestModelUri"] == f"s3://out/sw/{best}/model"
    # final.action promote (the default): the best trial's model is the sweep's, and its test result is reported
    assert status["modelUri"] == status["bestModelUri"] and "final" not in status
    assert status["bestGain"] == {"metric": "eval_loss", "baseline": 9.0, "final": values[best] + 0.01, "split": "test",
                                  "baselineKind": "base_model"}
    assert [e.reason for e in world.reconcile(spec).events] == []  # promoted once, not at every reconcile


def test_grid_visits_every_combination_once_and_stops_when_exhausted():
    world = World()
    spec = sweep(
        searchSpace=[{"path": "hyperparameters.learningRate", "type": "choice", "values": [1e-4, 1e-3]}, RANK],
        search={"algorithm": "grid"}, parallelism=2, maxTrials=100,
    )
    run_to_end(world, spec)
    combos = sorted((p["hyperparameters.learningRate"], p["lora.r"]) for p in map(world.params, world.jobs))
    assert combos == sorted((lr, r) for lr in (1e-4, 1e-3) for r in (4, 8, 16))
    assert world.status["phase"] == "Succeeded" and world.status["progress"] == "6/6"
    assert world.status["bestParams"] == {"hyperparameters.learningRate": 1e-3, "lora.r": 8}


def test_grid_survives_a_restart_without_repeating():
    """Rebuilt from the objects alone after each trial: still every combination exactly once."""
    world = World()
    spec = sweep(searchSpace=[RANK], search={"algorithm": "grid"}, parallelism=1)
    for _ in range(5):
        world.reconcile(spec)
        for name, job in world.jobs.items():
            if job["status"]["phase"] == "Running":
                world.finish(name)
    assert sorted(p["lora.r"] for p in map(world.params, world.jobs)) == [4, 8, 16]


def test_max_failed_trials_stops_new_trials():
    world = World()
    spec = sweep(parallelism=1, maxTrials=10, maxFailedTrials=1)
    for _ in range(4):
        world.reconcile(spec)
        for name, job in world.jobs.items():
            if job["status"]["phase"] == "Running":
                job["status"] = {"phase": "Failed", "failureReason": "OutOfMemory: the batch does not fit"}
    assert len(world.jobs) == 2  # the second failure is one more than maxFailedTrials
    assert world.status["phase"] == "Failed" and world.status["failed"] == 2
    assert "maxFailedTrials 1" in world.status["message"]
    assert world.status["trials"][0]["message"].startswith("OutOfMemory")


def test_restart_makes_the_same_decisions_from_the_same_objects():
    spec = sweep(parallelism=2, maxTrials=6, search={"algorithm": "tpe", "seed": 5})
    world = World()
    world.reconcile(spec)
    for name in list(world.jobs):
        world.finish(name)
    snapshot = json.loads(json.dumps(world.status))
    again = decide("sw", "ns", UID, spec, snapshot, world.observed())
    first = decide("sw", "ns", UID, spec, snapshot, world.observed())
    assert [b["metadata"]["annotations"] for b in first.create] == [b["metadata"]["annotations"] for b in again.create]
    assert first.status == again.status and len(first.create) == 2


def test_a_child_without_a_status_record_is_adopted():
    """The operator crashed after creating a trial but before writing status: the child's annotation restores it."""
    spec = sweep(parallelism=2, maxTrials=4)
    world = World()
    world.reconcile(spec)
    plan = decide("sw", "ns", UID, spec, None, world.observed())
    assert plan.create == []
    assert [r["params"] for r in plan.status["trials"]] == [world.params("sw-t0"), world.params("sw-t1")]


def test_median_pruner_suspends_the_losing_trial():
    spec = sweep(parallelism=3, maxTrials=3, pruning={"type": "median", "startupTrials": 2})
    world = World()
    world.reconcile(spec)
    # two trials finish with low losses at steps 10 and 20
    world.finish("sw-t0", 0.2)
    world.finish("sw-t1", 0.3)
    world.evaluate("sw-t2", 10, 5.0)  # far worse than both at step 10
    plan = world.reconcile(spec)
    assert plan.suspend == ["sw-t2"]
    rec = world.status["trials"][2]
    assert rec["state"] == "Pruned" and rec["intermediate"] == [{"step": 10, "value": 5.0}]
    assert world.status["pruned"] == 1 and world.status["phase"] == "Succeeded" and world.status["bestTrial"] == "sw-t0"
    assert any(e.reason == "TrialPruned" for e in plan.events)
    # suspended once; the next reconcile leaves it alone
    assert world.reconcile(spec).suspend == []


def test_median_pruner_keeps_a_trial_that_does_as_well():
    spec = sweep(parallelism=3, maxTrials=3, pruning={"type": "median", "startupTrials": 2})
    world = World()
    world.reconcile(spec)
    world.finish("sw-t0", 0.2)
    world.finish("sw-t1", 0.3)
    world.evaluate("sw-t2", 10, 0.1)
    plan = world.reconcile(spec)
    assert plan.suspend == [] and world.status["trials"][2]["state"] == "Running"


def test_successive_halving_prunes_at_a_rung():
    spec = sweep(parallelism=4, maxTrials=4, pruning={"type": "successive-halving", "minResource": 10, "reductionFactor": 2})
    world = World()
    world.reconcile(spec)
    for name, value in (("sw-t0", 0.1), ("sw-t1", 0.2), ("sw-t2", 0.3)):
        world.finish(name, value)
    world.evaluate("sw-t3", 10, 9.0)
    plan = world.reconcile(spec)
    assert plan.suspend == ["sw-t3"]


def test_observe_trial_ignores_foreign_objects():
    assert observe_trial({"metadata": {"name": "x", "labels": {}}}) is None


def test_successive_halving_promotes_a_good_trial():
    spec = sweep(parallelism=4, maxTrials=4, pruning={"type": "successive-halving", "minResource": 10, "reductionFactor": 2})
    world = World()
    world.reconcile(spec)
    for name, value in (("sw-t0", 0.1), ("sw-t1", 0.2), ("sw-t2", 0.3)):
        world.finish(name, value)
    world.evaluate("sw-t3", 10, 0.05)
    assert world.reconcile(spec).suspend == []
    assert world.status["trials"][3]["state"] == "Running"


def test_a_gap_in_the_trial_numbers_does_not_confuse_the_pruner():
    """Trial 1's record and job are gone (deleted by hand, status lost): trial 2 is still judged by its own values."""
    spec = sweep(parallelism=3, maxTrials=4, pruning={"type": "median", "startupTrials": 1})
    params = {"hyperparameters.learningRate": 1e-3, "lora.r": 8}
    status = {"trials": [
        {"number": 0, "name": "sw-t0", "params": params, "state": "Complete", "value": 0.2, "intermediate": [{"step": 10, "value": 0.2}]},
        {"number": 2, "name": "sw-t2", "params": params, "state": "Running"},
    ]}
    child = ObservedTrial(number=2, name="sw-t2", params=params, phase="Running", checkpoints=((10, 3.0),))
    plan = decide("sw", "ns", UID, spec, status, [child])
    assert plan.suspend == ["sw-t2"]
    assert [r["number"] for r in plan.status["trials"]] == [0, 2, 3, 4]  # new trials after the highest number


def test_values_that_make_no_valid_job_together_fail_that_trial_only():
    """method lora with distributedStrategy fsdp is invalid, though each value alone is fine: that trial fails, no job."""
    spec = parse_sweep({
        "template": {**TEMPLATE, "method": "full"},
        "searchSpace": [{"path": "method", "type": "choice", "values": ["full", "lora"]},
                        {"path": "hyperparameters.distributedStrategy", "type": "choice", "values": ["ddp", "fsdp"]}],
        "search": {"algorithm": "grid"}, "parallelism": 4, "maxTrials": 4, "maxFailedTrials": 1,
    })
    plan = decide("sw", "ns", UID, spec, None, [])
    failed = [r for r in plan.status["trials"] if r["state"] == "Failed"]
    assert [r["params"] for r in failed] == [{"method": "lora", "hyperparameters.distributedStrategy": "fsdp"}]
    assert "fsdp" in failed[0]["message"] and len(plan.create) == 3
    assert {r["name"] for r in failed}.isdisjoint(b["metadata"]["name"] for b in plan.create)


def test_tpe_never_repeats_a_trial_when_trials_finish_one_by_one():
    """Each reconcile rebuilds the sampler: its random stream must not start over (it did, proposing trial 0's
    parameters again as trial 2, in the first run of the example)."""
    spec = sweep(parallelism=2, maxTrials=8, search={"algorithm": "tpe", "seed": 1})
    world = World()
    world.reconcile(spec)
    for _ in range(20):
        running = sorted(n for n, j in world.jobs.items() if j["status"]["phase"] == "Running")
        if not running:
            break
        world.finish(running[0])
        world.reconcile(spec)
    tried = [json.dumps(world.params(n), sort_keys=True) for n in world.jobs]
    assert len(tried) == 8 and len(set(tried)) == 8


def test_final_retrain_trains_the_best_parameters_with_the_overrides_and_becomes_the_sweeps_model():
    world = World()
    spec = sweep(parallelism=2, maxTrials=4, search={"algorithm": "random", "seed": 5},
                 final={"action": "retrain", "overrides": {"hyperparameters": {"maxSteps": 200}}})
    run_to_end(world, spec, trials_only=True)
    status = world.status
    assert status["phase"] == "Running" and "sw-final" in status["message"]
    assert status["completed"] == 4 and "modelUri" not in status
    final = world.jobs["sw-final"]
    best = status["bestTrial"]
    assert final["metadata"]["labels"] == {LABEL_SWEEP: "sw", LABEL_FINAL: "true"}
    assert final["metadata"]["ownerReferences"][0]["uid"] == UID
    assert world.params("sw-final") == world.params(best) == status["final"]["params"]
    assert status["final"]["fromTrial"] == best
    assert final["spec"]["hyperparameters"]["maxSteps"] == 200  # the override
    assert final["spec"]["hyperparameters"]["learningRate"] == world.params(best)["hyperparameters.learningRate"]
    assert final["spec"]["lora"]["r"] == world.params(best)["lora.r"]
    assert final["spec"]["output"]["uri"] == "s3://out/sw/sw-final"
    assert world.reconcile(spec).create == []  # created once
    # an operator restart mid-retrain (status as written) changes nothing
    again = decide("sw", "ns", UID, spec, world.status, world.observed(), final=world.final())
    assert again.create == [] and again.status == world.status
    world.finish("sw-final", value=0.01)
    plan = world.reconcile(spec)
    assert world.status["phase"] == "Succeeded"
    assert world.status["modelUri"] == "s3://out/sw/sw-final/model"
    assert world.status["final"]["value"] == 0.01 and world.status["final"]["phase"] == "Succeeded"
    assert world.status["bestTrial"] == best  # the final job is not a trial: it does not compete
    assert "FinalRetrainSucceeded" in [e.reason for e in plan.events]


def test_a_failed_final_retrain_fails_the_sweep_with_its_reason():
    world = World()
    spec = sweep(maxTrials=2, search={"algorithm": "random", "seed": 1}, final={"action": "retrain"})
    run_to_end(world, spec, trials_only=True)
    assert world.status["phase"] == "Running" and "sw-final" in world.jobs
    world.jobs["sw-final"]["status"] = {"phase": "Failed", "failureReason": "OOM at step 3"}
    world.reconcile(spec)
    assert world.status["phase"] == "Failed"
    assert "the final retraining sw-final failed: OOM at step 3" in world.status["message"]
    assert "modelUri" not in world.status


def test_cross_validated_trials_are_compared_by_their_mean_over_folds():
    template = {**TEMPLATE, "dataset": {**TEMPLATE["dataset"], "crossValidation": {"folds": 3}}}
    spec = parse_sweep({"template": template, "searchSpace": [LR], "maxTrials": 2, "parallelism": 2})
    world = World()
    world.reconcile(spec)
    assert world.jobs["sw-t0"]["spec"]["dataset"]["crossValidation"]["folds"] == 3
    for name, mean in (("sw-t0", 0.7), ("sw-t1", 0.4)):
        world.finish(name, value=0.1)  # its refit's bestMetric: not what the sweep compares
        world.jobs[name]["status"]["crossValidation"] = {"folds": 3, "stratified": False, "mean": {"eval_loss": mean}, "std": {"eval_loss": 0.05}}
    world.reconcile(spec)
    assert world.status["phase"] == "Succeeded"
    assert {r["name"]: r["value"] for r in world.status["trials"]} == {"sw-t0": 0.7, "sw-t1": 0.4}
    assert world.status["bestTrial"] == "sw-t1" and world.status["bestValue"] == 0.4
    assert all("intermediate" not in r for r in world.status["trials"])  # fold checkpoints restart their steps


def test_a_namespace_that_has_not_opted_in_holds_the_sweep_pending_with_no_trial():
    world = World()
    spec = sweep(parallelism=2, maxTrials=4)
    plan = world.reconcile(spec, refused="namespace ns lacks the label(s) finetune.io/enabled=true")
    assert plan.create == [] and world.jobs == {}
    assert world.status["phase"] == "Pending" and "finetune.io/enabled" in world.status["message"]
    plan = world.reconcile(spec)  # labelled since
    assert len(plan.create) == 2 and world.status["phase"] == "Running"
