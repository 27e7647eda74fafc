"""Every evaluation metric the trainer reports, in one table: name -> task, direction, title, exporter name.

Early stopping and best-model selection (which way is better), the gain over the base model, the model
card (titles, column order, which numbers are counts) and the Prometheus exporter (which series exist)
all read this table, and the spec reads it to default ``earlyStopping.mode`` to the metric's direction
and to reject a mode that contradicts it. A metric missing here is one no consumer knows about.

The table is in the contract package because both sides need it: the operator's admission (the spec
and its CEL rules) and the trainer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Direction = Literal["min", "max"]
MetricTask = Literal["causal-lm", "sequence-classification", "seq2seq-lm", "preference", "any"]
"""``preference`` is a causal LM trained with objective dpo or simpo: its evaluations report the pair metrics
(and eval_loss, the objective's loss) instead of perplexity and token accuracy."""

LM_TASKS = ("causal-lm", "seq2seq-lm")
"""The language-model tasks: a ``causal-lm`` metric (loss per token, BLEU, ROUGE-L, ...) applies to both."""


@dataclass(frozen=True)
class Metric:
    """One reported number.

    ``direction`` is None for counts (how many rows or tokens were scored): they are shown, never judged.
    ``needs`` is the ``evaluation.metrics`` entry that turns the metric on (bleu, rouge), None when it is
    always computed for its task. ``label_accuracy`` (exact match of a generated completion with its reference) comes
    with BLEU/ROUGE only when the references are a few labels (classification as generation). ``prometheus`` is the ``metric`` label of the ``finetune_eval`` series,
    None when the number is not exported.
    """

    name: str
    task: MetricTask
    direction: Direction | None
    title: str
    prometheus: str | None
    needs: str | None = None
    watchable: bool = True
    """False for a metric whose presence depends on the data (label_accuracy): never an early-stopping metric."""


# In the order the model card lists them.
METRICS: tuple[Metric, ...] = (
    Metric("eval_loss", "any", "min", "Loss", "eval_loss"),
    Metric("perplexity", "causal-lm", "min", "Perplexity", "perplexity"),
    Metric("token_accuracy", "causal-lm", "max", "Token accuracy", "token_accuracy"),
    Metric("accuracy", "sequence-classification", "max", "Accuracy", "accuracy"),
    Metric("f1_macro", "sequence-classification", "max", "F1 (macro)", "f1_macro"),
    Metric("precision_macro", "sequence-classification", "max", "Precision (macro)", "precision_macro"),
    Metric("recall_macro", "sequence-classification", "max", "Recall (macro)", "recall_macro"),
    Metric("ece", "sequence-classification", "min", "ECE (15 bins)", "ece"),
    Metric("bleu", "causal-lm", "max", "BLEU", "bleu", needs="bleu"),
    Metric("rouge_1", "seq2seq-lm", "max", "ROUGE-1 F1", "rouge_1", needs="rouge"),
    Metric("rouge_2", "seq2seq-lm", "max", "ROUGE-2 F1", "rouge_2", needs="rouge"),
    Metric("rouge_l", "causal-lm", "max", "ROUGE-L F1", "rouge_l", needs="rouge"),
    Metric("label_accuracy", "causal-lm", "max", "Label accuracy (generated)", "label_accuracy", watchable=False),
    # Preference objectives (dpo, simpo): a pair's reward is the objective's implicit reward of each response (dpo:
    # beta * (log pi - log ref); simpo: beta * mean token log pi); logp_accuracy compares the mean token log-probs, so
    # it is defined for the base model too (its implicit preference: the honest baseline of reward_accuracy).
    Metric("reward_accuracy", "preference", "max", "Reward accuracy", "reward_accuracy"),
    Metric("reward_margin", "preference", "max", "Reward margin (chosen - rejected)", "reward_margin"),
    Metric("chosen_reward", "preference", "max", "Chosen reward", "chosen_reward"),
    Metric("rejected_reward", "preference", "min", "Rejected reward", "rejected_reward"),
    Metric("logp_accuracy", "preference", "max", "Log-prob preference accuracy", "logp_accuracy"),
    Metric("eval_tokens", "causal-lm", None, "Scored tokens", None),
    Metric("eval_samples", "sequence-classification", None, "Examples", None),
    Metric("generation_samples", "causal-lm", None, "Generated samples", None),
    Metric("eval_pairs", "preference", None, "Pairs", None),
)
BY_NAME: dict[str, Metric] = {m.name: m for m in METRICS}

GENERATION_METRICS: dict[str, str] = {m.needs: m.name for m in METRICS if m.needs}
"""``evaluation.metrics`` entry -> the metric it reports (``rouge`` -> ``rouge_l``: the last row of an entry wins,
so rouge_1/rouge_2, which seq2seq-lm reports besides, stay before rouge_l in the table)."""


def applies(metric: Metric, task: str) -> bool:
    """Whether ``task`` reports ``metric``: its own task's metrics, ``any``, and for seq2seq-lm the causal-lm ones."""
    return metric.task in (task, "any") or (task == "seq2seq-lm" and metric.task == "causal-lm")


def direction(name: str) -> Direction | None:
    """``min`` or ``max`` for a judged metric; None for counts and metrics not in the table."""
    metric = BY_NAME.get(name)
    return metric.direction if metric else None


def judged(direction_: Direction) -> tuple[str, ...]:
    """The metrics for which ``direction_`` is better, in table order (the CEL rules list them)."""
    return tuple(m.name for m in METRICS if m.direction == direction_)


def monitorable(task: str, requested: list[str] | None = None) -> tuple[str, ...]:
    """What an evaluation of ``task`` computes and early stopping can therefore watch.

    ``requested`` is ``evaluation.metrics``: the generation metrics are computed only when asked for.
    """
    wanted = set(requested or ())
    return tuple(
        m.name
        for m in METRICS
        if m.direction is not None and m.watchable and applies(m, task) and (m.needs is None or m.needs in wanted)
    )


def title(name: str) -> str:
    metric = BY_NAME.get(name)
    return metric.title if metric else name


def exported() -> tuple[Metric, ...]:
    """The metrics the trainer exports as ``finetune_eval{metric=...}``."""
    return tuple(m for m in METRICS if m.prometheus)


def mode_rule(direction_: Direction) -> str:
    """The words used when ``earlyStopping.mode`` contradicts the metric (pydantic and CEL alike)."""
    better = "lower" if direction_ == "min" else "higher"
    return (
        f"evaluation.earlyStopping.mode must be {direction_} for metric {', '.join(judged(direction_))} "
        f"({better} is better); leave mode unset to follow the metric"
    )
