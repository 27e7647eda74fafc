"""The sweep gauges follow the status the decider wrote, and go with the sweep."""

from finetune_operator import metrics, sweep_handlers


def _value(name: str, **labels: str) -> float | None:
    return metrics.REGISTRY.get_sample_value(name, labels)


def test_trial_counts_and_best_value_then_forgotten():
    status = {"running": 1, "completed": 2, "pruned": 3, "failed": 0, "bestValue": 0.25}
    sweep_handlers.record_metrics("ns", "sw", "eval_loss", status)
    assert _value("finetune_operator_sweep_trials", namespace="ns", sweep="sw", state="Pruned") == 3
    assert _value("finetune_operator_sweep_trials", namespace="ns", sweep="sw", state="Complete") == 2
    assert _value("finetune_operator_sweep_trials", namespace="ns", sweep="sw", state="Failed") == 0
    assert _value("finetune_operator_sweep_best_value", namespace="ns", sweep="sw", metric="eval_loss") == 0.25
    sweep_handlers.forget("uid", "ns", "sw")
    assert _value("finetune_operator_sweep_trials", namespace="ns", sweep="sw", state="Pruned") is None
    assert _value("finetune_operator_sweep_best_value", namespace="ns", sweep="sw", metric="eval_loss") is None
