"""The FineTuneSweep decider (pure): sweep spec + recorded status + observed trial FineTuneJobs -> a plan.

Every reconcile rebuilds an in-memory Optuna study from the trials the sweep's status records (and the
trial FineTuneJobs, whose annotation holds their parameters, for a trial created just before a crash),
then asks Optuna which running trials to prune and which parameters the next trials get. Nothing lives
in the operator between two reconciles, so an operator that restarts makes the same decisions from the
same objects; the samplers are seeded from ``spec.search.seed`` for that reason.

Where the numbers come from (a trial's FineTuneJob status):
- intermediate values: ``status.checkpoints[].metric``, the monitored metric at each checkpoint's step.
  Checkpoint steps are the same for every trial of a sweep (one template), which is what the pruners
  compare across trials; the sweep accumulates them in its own status (the job keeps only its newest).
- the final value: ``status.progress.bestMetric`` (the best validation value of the monitored metric)
  once the job has Succeeded.

A pruned trial is suspended (``spec.runPolicy.suspend: true``), not deleted: its pods stop and free their
quota, while the job, its checkpoints and its status stay to be looked at (and go with the sweep).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any, Mapping

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState as OptunaState

from finetune_api.spec import API_GROUP, API_VERSION, KIND
from finetune_api.sweep import (
    ANNOTATION_PARAMS,
    FINAL_SUFFIX,
    LABEL_FINAL,
    FinalAction,
    LABEL_SWEEP,
    LABEL_TRIAL,
    MAX_INTERMEDIATE,
    SWEEP_API_VERSION,
    SWEEP_KIND,
    FineTuneSweepSpec,
    SweepPhase,
    TrialState,
    first_line,
    trial_spec,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)
log = logging.getLogger(__name__)


def trial_name(sweep: str, number: int) -> str:
    return f"{sweep}-t{number}"


@dataclass(frozen=True)
class ObservedTrial:
    """What the sweep reads from one trial FineTuneJob."""

    number: int
    name: str
    params: dict[str, Any]
    phase: str | None = None
    suspended: bool = False
    checkpoints: tuple[tuple[int, float], ...] = ()
    best_metric: float | None = None
    best_metric_name: str | None = None
    model_uri: str | None = None
    failure: str | None = None
    gain: dict[str, Any] | None = None
    cv_mean: dict[str, float] | None = None
    """dataset.crossValidation: status.crossValidation.mean (each metric's mean over the folds)."""


def observe_trial(body: Mapping[str, Any]) -> ObservedTrial | None:
    """A trial FineTuneJob as the decider sees it; None for an object that is not one."""
    meta = body.get("metadata") or {}
    try:
        number = int((meta.get("labels") or {})[LABEL_TRIAL])
        params = json.loads((meta.get("annotations") or {})[ANNOTATION_PARAMS])
    except (KeyError, ValueError, TypeError):
        return None
    return _observe(body, number, params)


def observe_final(body: Mapping[str, Any]) -> ObservedTrial | None:
    """The sweep's final retraining FineTuneJob (label finetune.io/sweep-final); None for any other object."""
    meta = body.get("metadata") or {}
    if (meta.get("labels") or {}).get(LABEL_FINAL) != "true":
        return None
    try:
        params = json.loads((meta.get("annotations") or {})[ANNOTATION_PARAMS])
    except (KeyError, ValueError, TypeError):
        params = {}
    return _observe(body, -1, params if isinstance(params, dict) else {})


def _observe(body: Mapping[str, Any], number: int, params: Any) -> ObservedTrial:
    meta = body.get("metadata") or {}
    status = body.get("status") or {}
    progress = status.get("progress") or {}
    checkpoints = tuple(
        (int(c["step"]), float(c["metric"])) for c in status.get("checkpoints") or () if c.get("metric") is not None and "step" in c
    )
    return ObservedTrial(
        number=number,
        name=meta.get("name", ""),
        params=params if isinstance(params, dict) else {},
        phase=status.get("phase"),
        suspended=bool(((body.get("spec") or {}).get("runPolicy") or {}).get("suspend")),
        checkpoints=checkpoints,
        best_metric=progress.get("bestMetric"),
        best_metric_name=progress.get("bestMetricName"),
        model_uri=status.get("modelUri"),
        failure=status.get("failureReason") or status.get("message"),
        gain=status.get("gain") if isinstance(status.get("gain"), dict) else None,
        cv_mean=((status.get("crossValidation") or {}).get("mean") or None) if isinstance(status.get("crossValidation"), dict) else None,
    )


def _metric_in(values: Mapping[str, Any] | None, metric: str) -> float | None:
    """``metric`` in a name -> value mapping that may spell it with or without the ``eval_`` prefix."""
    for key in (metric, metric.removeprefix("eval_"), f"eval_{metric}"):
        value = (values or {}).get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value:
            return float(value)
    return None


def final_value(trial: ObservedTrial, spec: FineTuneSweepSpec, intermediate: list[dict[str, Any]] | None = None) -> float | None:
    """A succeeded job's value of the objective: the mean over its folds (crossValidation), else its best
    validation value (status.progress.bestMetric), else the best of the values seen at its checkpoints."""
    metric = spec.objective.metric
    if spec.template.dataset.cross_validation is not None:
        return _metric_in(trial.cv_mean, metric)
    value = trial.best_metric if trial.best_metric_name in (None, metric) else None
    if value is None and intermediate:
        values = [iv["value"] for iv in intermediate]
        value = max(values) if spec.direction == "max" else min(values)
    return None if value is None else float(value)


@dataclass
class Event:
    type: str  # Normal or Warning
    reason: str
    message: str


@dataclass
class SweepPlan:
    create: list[dict[str, Any]] = field(default_factory=list)
    """Trial FineTuneJobs to create."""
    suspend: list[str] = field(default_factory=list)
    """Trial FineTuneJobs to suspend (pruned)."""
    status: dict[str, Any] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)


# -------------------------------------------------------------------------------------------- Optuna


def distributions(spec: FineTuneSweepSpec) -> dict[str, BaseDistribution]:
    out: dict[str, BaseDistribution] = {}
    for p in spec.search_space:
        if spec.search.algorithm == "grid" or p.type == "choice":
            out[p.path] = CategoricalDistribution(p.candidates())
        elif p.type == "int":
            out[p.path] = IntDistribution(int(p.low or 0), int(p.high or 0), step=p.step or 1)
        else:
            out[p.path] = FloatDistribution(float(p.low or 0), float(p.high or 0), log=p.type == "log-uniform")
    return out


def grid_size(spec: FineTuneSweepSpec) -> int | None:
    if spec.search.algorithm != "grid":
        return None
    size = 1
    for p in spec.search_space:
        size *= len(p.candidates())
    return size


def _sampler(spec: FineTuneSweepSpec, trials: int) -> optuna.samplers.BaseSampler:
    """The sampler of a study rebuilt with ``trials`` trials in it. Its seed moves on with that count: a
    fresh sampler with the sweep's seed alone would start its random stream over at every reconcile and
    propose the first trial's parameters again. Still deterministic: the same objects, the same seed. The grid
    keeps the sweep's seed: it shuffles its combinations with it, and the recorded grid ids index that order
    (it never repeats one: it skips the ids the trials record)."""
    if spec.search.algorithm == "grid":
        return optuna.samplers.GridSampler({p.path: p.candidates() for p in spec.search_space}, seed=spec.search.seed)
    seed = spec.search.seed + trials
    if spec.search.algorithm == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # TPE models the results once it has some: the first trials are random (Optuna's default of 10 would
    # leave a small sweep random throughout), a third of the budget, between 2 and 10
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(2, spec.max_trials // 3)))


def _pruner(spec: FineTuneSweepSpec) -> optuna.pruners.BasePruner:
    p = spec.pruning
    if p is None:
        return optuna.pruners.NopPruner()
    if p.type == "successive-halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=p.min_resource, reduction_factor=p.reduction_factor)
    return optuna.pruners.MedianPruner(n_startup_trials=p.startup_trials, n_warmup_steps=p.warmup_steps)


_STATES = {
    TrialState.running.value: OptunaState.RUNNING,
    TrialState.complete.value: OptunaState.COMPLETE,
    TrialState.pruned.value: OptunaState.PRUNED,
    TrialState.failed.value: OptunaState.FAIL,
}


def build_study(spec: FineTuneSweepSpec, records: list[dict[str, Any]]) -> optuna.Study:
    """A fresh in-memory study holding the recorded trials, in trial-number order."""
    study = optuna.create_study(
        direction="maximize" if spec.direction == "max" else "minimize", sampler=_sampler(spec, len(records)), pruner=_pruner(spec)
    )
    dists = distributions(spec)
    grid_space = {p.path: p.candidates() for p in spec.search_space} if spec.search.algorithm == "grid" else None
    for rec in records:
        params = {k: v for k, v in rec["params"].items() if k in dists and dists[k]._contains(dists[k].to_internal_repr(v))}
        system_attrs: dict[str, Any] = {"grid_id": rec["gridId"], "search_space": grid_space} if grid_space is not None and "gridId" in rec else {}
        state = _STATES[rec["state"]]
        system_attrs.update(_rungs(spec, rec.get("intermediate") or [], finished=state != OptunaState.RUNNING))
        study.add_trial(
            optuna.trial.create_trial(
                state=state,
                params=params,
                distributions={k: dists[k] for k in params},
                value=rec.get("value") if state == OptunaState.COMPLETE else None,
                intermediate_values={int(iv["step"]): float(iv["value"]) for iv in rec.get("intermediate") or ()},
                system_attrs=system_attrs,
            )
        )
    return study


def _rungs(spec: FineTuneSweepSpec, intermediate: list[dict[str, Any]], *, finished: bool) -> dict[str, float]:
    """successive-halving: the ``completed_rung_<r>`` values the pruner wrote on a trial while it ran (Optuna
    keeps them in the trial's system attributes; a rebuilt study has to be given them). Rung r is passed at
    step minResource * reductionFactor**r, with the value of the first evaluation at or after it. A running
    trial's newest evaluation is left out: the pruner judges it now."""
    if spec.pruning is None or spec.pruning.type != "successive-halving":
        return {}
    points = sorted((int(iv["step"]), float(iv["value"])) for iv in intermediate)
    if not finished:
        points = points[:-1]
    out: dict[str, float] = {}
    rung = 0
    for step, value in points:
        while step >= spec.pruning.min_resource * spec.pruning.reduction_factor**rung:
            out[f"completed_rung_{rung}"] = value
            rung += 1
    return out


def _safe(value: Any) -> Any:
    """A parameter value as JSON keeps it (numpy scalars from the samplers become Python numbers)."""
    return value.item() if hasattr(value, "item") else value


# ------------------------------------------------------------------------------------------- decide


def _merge(records: dict[int, dict[str, Any]], trial: ObservedTrial | None, rec: dict[str, Any], spec: FineTuneSweepSpec,
           events: list[Event]) -> None:
    """Bring one recorded Running trial up to date with its FineTuneJob."""
    if trial is None:
        rec.update(state=TrialState.failed.value, message="its FineTuneJob was deleted")
        events.append(Event("Warning", "TrialFailed", f"{rec['name']}: its FineTuneJob was deleted"))
        return
    seen = {int(iv["step"]) for iv in rec.get("intermediate") or ()}
    cv = spec.template.dataset.cross_validation is not None  # checkpoint steps restart at every fold: no curve to prune on
    new = [] if cv else [{"step": s, "value": v} for s, v in trial.checkpoints if s not in seen]
    if new:
        merged = sorted([*(rec.get("intermediate") or []), *new], key=lambda iv: iv["step"])
        rec["intermediate"] = merged[-MAX_INTERMEDIATE:]
    if trial.phase == "Succeeded":
        value = final_value(trial, spec, rec.get("intermediate"))
        if value is None:
            rec.update(state=TrialState.failed.value, message=f"the job succeeded without a value of {spec.objective.metric}")
            events.append(Event("Warning", "TrialFailed", f"{rec['name']}: no value of {spec.objective.metric}"))
            return
        rec.update(state=TrialState.complete.value, value=float(value))
        if trial.model_uri:
            rec["modelUri"] = trial.model_uri
        if trial.gain:
            rec["gain"] = dict(trial.gain)
        events.append(Event("Normal", "TrialCompleted", f"{rec['name']}: {spec.objective.metric}={value:.6g} with {_fmt(rec['params'])}"))
    elif trial.phase == "Failed":
        rec.update(state=TrialState.failed.value, message=(trial.failure or "the job failed")[:1024])
        events.append(Event("Warning", "TrialFailed", f"{rec['name']}: {trial.failure or 'the job failed'}"))


def _fmt(params: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def final_name(sweep: str) -> str:
    return f"{sweep}-{FINAL_SUFFIX}"


def _child(name: str, namespace: str, uid: str, spec: FineTuneSweepSpec, number: int | None, params: dict[str, Any]) -> dict[str, Any]:
    """Trial ``number``'s FineTuneJob, or (number None) the final retraining with final.overrides."""
    if number is None:
        child_name, labels = final_name(name), {LABEL_SWEEP: name, LABEL_FINAL: "true"}
        job_spec = trial_spec(spec.template, params, child_name, overrides=spec.final.overrides)
    else:
        child_name, labels = trial_name(name, number), {LABEL_SWEEP: name, LABEL_TRIAL: str(number)}
        job_spec = trial_spec(spec.template, params, child_name)
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": KIND,
        "metadata": {
            "name": child_name,
            "namespace": namespace,
            "labels": labels,
            "annotations": {ANNOTATION_PARAMS: json.dumps(params, sort_keys=True)},
            "ownerReferences": [
                {"apiVersion": SWEEP_API_VERSION, "kind": SWEEP_KIND, "name": name, "uid": uid, "controller": True, "blockOwnerDeletion": True}
            ],
        },
        "spec": job_spec.wire(),
    }


def decide(name: str, namespace: str, uid: str, spec: FineTuneSweepSpec, status: Mapping[str, Any] | None,
           children: list[ObservedTrial], generation: int | None = None, *, final: ObservedTrial | None = None,
           refused: str | None = None) -> SweepPlan:
    """``children``: the trial jobs; ``final``: the <sweep>-final job if there is one; ``refused``: why the
    operator does not serve the namespace (namespaceSelector), which holds the sweep Pending with no trial."""
    plan = SweepPlan()
    if refused is not None and not (status or {}).get("trials") and not children:
        plan.status = {"phase": SweepPhase.pending.value, "message": refused}
        if generation is not None:
            plan.status["observedGeneration"] = generation
        return plan
    by_number = {c.number: c for c in children}
    records: dict[int, dict[str, Any]] = {int(r["number"]): dict(r) for r in (status or {}).get("trials") or ()}
    for child in children:  # created just before a crash, before its record was written
        if child.number not in records:
            records[child.number] = {"number": child.number, "name": child.name, "params": child.params, "state": TrialState.running.value}
    for number in sorted(records):
        rec = records[number]
        if rec["state"] == TrialState.running.value:
            _merge(records, by_number.get(number), rec, spec, plan.events)
    ordered = [records[n] for n in sorted(records)]

    # prune: a running trial whose intermediate values lose to the others'
    study = build_study(spec, ordered)
    if spec.pruning is not None:
        for index, rec in enumerate(ordered):  # the study holds the records in this order
            if rec["state"] != TrialState.running.value or not rec.get("intermediate"):
                continue
            if study.pruner.prune(study, study.trials[index]):
                last = rec["intermediate"][-1]
                rec.update(state=TrialState.pruned.value, message=f"pruned at step {last['step']} ({spec.objective.metric}={last['value']:.6g})")
                plan.events.append(Event("Normal", "TrialPruned", f"{rec['name']}: {rec['message']}"))
        study = build_study(spec, ordered)
    for rec in ordered:  # level-triggered: a pruned trial stays suspended
        observed = by_number.get(rec["number"])
        if (rec["state"] == TrialState.pruned.value and observed is not None and not observed.suspended
                and observed.phase not in ("Succeeded", "Failed")):
            plan.suspend.append(observed.name)

    counts = {s.value: sum(1 for r in ordered if r["state"] == s.value) for s in TrialState}
    limit = min(spec.max_trials, grid_size(spec) or spec.max_trials)
    too_many_failures = counts[TrialState.failed.value] > spec.max_failed_trials
    dists = distributions(spec)
    numbers = [r["number"] for r in ordered]
    while not too_many_failures and counts[TrialState.running.value] < spec.parallelism and len(ordered) < limit:
        number = max(numbers, default=-1) + 1
        trial = study.ask(dists)
        params = {k: _safe(v) for k, v in trial.params.items()}
        rec = {"number": number, "name": trial_name(name, number), "params": params, "state": TrialState.running.value}
        if "grid_id" in study.trials[-1].system_attrs:
            rec["gridId"] = int(study.trials[-1].system_attrs["grid_id"])
        try:
            plan.create.append(_child(name, namespace, uid, spec, number, params))
            plan.events.append(Event("Normal", "TrialCreated", f"{rec['name']}: {_fmt(params)}"))
        except ValueError as exc:  # these values together make no valid FineTuneJob: a failed trial, no job
            message = f"the parameters make no valid FineTuneJob: {first_line(exc)}"[:1024]
            rec.update(state=TrialState.failed.value, message=message)
            plan.events.append(Event("Warning", "TrialFailed", f"{rec['name']}: {message}"))
            study.tell(trial, state=OptunaState.FAIL)
            counts[TrialState.failed.value] += 1
            too_many_failures = counts[TrialState.failed.value] > spec.max_failed_trials
            ordered.append(rec)
            numbers.append(number)
            continue
        ordered.append(rec)
        numbers.append(number)
        counts[TrialState.running.value] += 1

    if refused is not None:  # a namespace that stopped opting in: nothing new starts here
        plan.create = []
    plan.status = _status(spec, ordered, counts, limit, too_many_failures, generation)
    _finalise(name, namespace, uid, spec, status, plan, final, refused)
    return plan


def _finalise(name: str, namespace: str, uid: str, spec: FineTuneSweepSpec, old: Mapping[str, Any] | None, plan: SweepPlan,
              final: ObservedTrial | None, refused: str | None) -> None:
    """The last step once every trial finished with a best one (the status says Succeeded): promote its model,
    or retrain its parameters as <sweep>-final and succeed (or fail) with that job."""
    status = plan.status
    if status["phase"] != SweepPhase.succeeded.value:
        return
    best = next(r for r in status["trials"] if r["name"] == status["bestTrial"])
    if best.get("gain"):
        status["bestGain"] = best["gain"]
    if spec.final.action == FinalAction.promote.value:
        if status.get("bestModelUri"):
            status["modelUri"] = status["bestModelUri"]
            if (old or {}).get("modelUri") != status["modelUri"]:
                plan.events.append(Event("Normal", "BestModelPromoted", f"{best['name']}'s model is the sweep's: {status['modelUri']}"))
        return
    record = dict((old or {}).get("final") or {})
    if not record:  # pinned when first created: the trials are over, the best one cannot change
        record = {"name": final_name(name), "fromTrial": best["name"], "params": dict(best["params"])}
    trials_done = status["message"]
    if final is None:  # not created yet, or (its phase recorded as ended) deleted after it ran: that outcome stands
        if record.get("phase") not in ("Succeeded", "Failed") and refused is None:
            plan.create.append(_child(name, namespace, uid, spec, None, record["params"]))
            plan.events.append(Event("Normal", "FinalRetrainCreated", f"{record['name']}: the parameters of {record['fromTrial']} ({_fmt(record['params'])})"))
            record["phase"] = "Pending"
    else:
        record["phase"] = final.phase or "Pending"
        if final.phase == "Succeeded":
            value = final_value(final, spec)
            if value is not None:
                record["value"] = value
            if final.model_uri:
                record["modelUri"] = final.model_uri
        elif final.phase == "Failed":
            record["message"] = (final.failure or "the job failed")[:1024]
    status["final"] = record
    if record.get("phase") == "Succeeded" and record.get("modelUri"):
        status["modelUri"] = record["modelUri"]
        status["message"] = f"{trials_done}; retrained as {record['name']}: {status['modelUri']}"
        if (old or {}).get("phase") != SweepPhase.succeeded.value:
            plan.events.append(Event("Normal", "FinalRetrainSucceeded", f"{record['name']}: {status['modelUri']}"))
    elif record.get("phase") in ("Succeeded", "Failed"):
        status["phase"] = SweepPhase.failed.value
        status["message"] = f"{trials_done}; the final retraining {record['name']} failed: {record.get('message') or 'it exported no model'}"
    else:
        status["phase"] = SweepPhase.running.value
        status["message"] = f"{trials_done}; retraining its parameters as {record['name']} ({record['phase']})"


def _status(spec: FineTuneSweepSpec, ordered: list[dict[str, Any]], counts: dict[str, int], limit: int,
            too_many_failures: bool, generation: int | None) -> dict[str, Any]:
    complete = [r for r in ordered if r["state"] == TrialState.complete.value]
    best = None
    if complete:
        sign = -1.0 if spec.direction == "max" else 1.0
        best = min(complete, key=lambda r: (sign * r["value"], r["number"]))  # ties: the earlier trial
    finished = len(ordered) - counts[TrialState.running.value]
    running = counts[TrialState.running.value]
    if too_many_failures:
        phase, message = SweepPhase.failed.value, (
            f"{counts[TrialState.failed.value]} trials failed, more than maxFailedTrials {spec.max_failed_trials}; no new trial starts"
        )
    elif running == 0 and len(ordered) >= limit:
        if best is None:
            phase, message = SweepPhase.failed.value, "no trial completed with a value of the objective"
        else:
            phase, message = SweepPhase.succeeded.value, f"best {spec.objective.metric}={best['value']:.6g} by {best['name']}"
    else:
        phase, message = SweepPhase.running.value, f"{running} running, {finished} of {limit} finished"
    status: dict[str, Any] = {
        "phase": phase,
        "message": message,
        "trials": ordered,
        "running": running,
        "completed": counts[TrialState.complete.value],
        "pruned": counts[TrialState.pruned.value],
        "failed": counts[TrialState.failed.value],
        "progress": f"{finished}/{limit}",
    }
    if generation is not None:
        status["observedGeneration"] = generation
    if best is not None:
        status.update(bestTrial=best["name"], bestValue=best["value"], bestParams=best["params"])
        if best.get("modelUri"):
            status["bestModelUri"] = best["modelUri"]
    return status
