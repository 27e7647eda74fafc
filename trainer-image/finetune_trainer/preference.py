"""Preference objectives (``objective.type`` dpo, simpo): the losses, the pair batches, the reference and the metrics.

The losses are written here, from the papers' formulas, because no library we depend on exposes them as plain
functions of log-probabilities: TRL has them as methods of its ``DPOTrainer``/``CPOTrainer`` (they need the whole
trainer, its config and its data collator), and the trainer's loop, resume and failure handling are ours. Unit
tests check both against the formulas computed independently.

- DPO (Rafailov et al. 2023, eq. 7): ``-log sigmoid(beta * ((log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))))``,
  rewards ``beta * (log pi(y) - log ref(y))``; log-probabilities are sums over the response tokens.
- SimPO (Meng et al. 2024, eq. 6): ``-log sigmoid(beta / |y_w| * log pi(y_w) - beta / |y_l| * log pi(y_l) - gamma)``,
  rewards ``beta / |y| * log pi(y)`` (the mean token log-probability): no reference model.

The reference of DPO is the base model. Its log-probabilities of every pair (train, validation, test) are computed
once, after loading and before any step, with the adapter disabled (adapter methods; peft's ``disable_adapter``) or
from the untouched base weights (method full), and attached to the datasets as two columns. That costs one forward
pass over the data instead of one per step, needs no second copy of a full model, and is exact on resume: the
resumed process computes them again from the same base weights (setup runs before the checkpoint is loaded). Every
rank computes them for every row, so under FSDP each forward is the same collective everywhere.

A batch holds ``2B`` rows: the ``B`` chosen rows, then the ``B`` rejected rows of the same pairs (one forward pass
for both sides, as TRL's concatenated forward), padded together, with ``ref_logps`` ``[B, 2]`` when there is a
reference. The loss of a micro-batch is its pairs' summed loss over the window's pairs across all ranks (the same
accumulation rule as :mod:`.loss`, with pairs where the LM loss has tokens).

Metrics (:func:`evaluate_preference`): ``eval_loss`` (the objective's loss), ``reward_accuracy`` (fraction of
pairs whose chosen reward is strictly higher), ``reward_margin``, ``chosen_reward``, ``rejected_reward`` (means), and
``logp_accuracy``: the fraction of pairs whose chosen response has the higher mean token log-probability under the
model. For the base model that is its implicit preference, the honest baseline of reward_accuracy (a DPO policy
equal to its reference has every reward 0, so its reward accuracy says nothing; for SimPO the two are equal).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from . import distributed
from .collate import IGNORE_INDEX, _ListDataset, _pad

if TYPE_CHECKING:
    import datasets
    from accelerate import Accelerator
    from finetune_api.spec import FineTuneJobSpec

log = logging.getLogger(__name__)

DPO, SIMPO = "dpo", "simpo"
REFERENCE_COLUMNS = ("ref_chosen_logp", "ref_rejected_logp")
ROW_COLUMNS = ("input_ids", "labels", "rejected_input_ids", "rejected_labels", *REFERENCE_COLUMNS)

Batch = dict[str, torch.Tensor]


# ------------------------------------------------------------------------------------------- losses


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO losses, chosen rewards and rejected rewards from summed response log-probabilities."""
    chosen_rewards = beta * (policy_chosen - ref_chosen)
    rejected_rewards = beta * (policy_rejected - ref_rejected)
    return -F.logsigmoid(chosen_rewards - rejected_rewards), chosen_rewards, rejected_rewards


def simpo_loss(policy_chosen: torch.Tensor, chosen_tokens: torch.Tensor, policy_rejected: torch.Tensor, rejected_tokens: torch.Tensor,
               beta: float, gamma: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair SimPO losses, chosen rewards and rejected rewards (length-normalised, reference-free)."""
    chosen_rewards = beta * policy_chosen / chosen_tokens.clamp(min=1)
    rejected_rewards = beta * policy_rejected / rejected_tokens.clamp(min=1)
    return -F.logsigmoid(chosen_rewards - rejected_rewards - gamma), chosen_rewards, rejected_rewards


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability of the scored tokens, their count) per row; logits at t score labels[t + 1]."""
    target = labels[:, 1:]
    nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), target.reshape(-1),
                          ignore_index=IGNORE_INDEX, reduction="none").view(target.shape)
    return -nll.sum(dim=-1), (target != IGNORE_INDEX).sum(dim=-1)


def _forward_logps(model: Any, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    return sequence_logps(model(**inputs).logits, batch["labels"])


# -------------------------------------------------------------------------------------------- batches


class PairCollator:
    """``B`` pairs -> ``2B`` padded rows (chosen first), plus ``ref_logps`` [B, 2] when the rows carry them."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = int(pad_token_id)

    def __call__(self, rows: list[dict[str, Any]]) -> Batch:
        ids = [list(r["input_ids"]) for r in rows] + [list(r["rejected_input_ids"]) for r in rows]
        labels = [list(r["labels"]) for r in rows] + [list(r["rejected_labels"]) for r in rows]
        batch = {
            "input_ids": _pad(ids, self.pad_token_id),
            "attention_mask": _pad([[1] * len(s) for s in ids], 0),
            "labels": _pad(labels, IGNORE_INDEX),
        }
        if rows and REFERENCE_COLUMNS[0] in rows[0]:
            batch["ref_logps"] = torch.tensor([[r[c] for c in REFERENCE_COLUMNS] for r in rows], dtype=torch.float32)
        return batch


def eval_loader(dataset: datasets.Dataset | None, *, batch_size: int, pad_token_id: int,
                max_samples: int | None = None) -> torch.utils.data.DataLoader | None:
    """Unshuffled pair batches of ``dataset`` (None when there is nothing to evaluate)."""
    if dataset is None or len(dataset) == 0:
        return None
    if max_samples is not None and len(dataset) > max_samples:
        dataset = dataset.select(range(max_samples))
    return torch.utils.data.DataLoader(_ListDataset(dataset, list(ROW_COLUMNS)), batch_size=batch_size, shuffle=False,
                                       collate_fn=PairCollator(pad_token_id))


# ---------------------------------------------------------------------------------------- the objective


@dataclass(frozen=True)
class PreferenceLoss:
    """The window loss of a preference objective; the same interface as :class:`.loss.WindowLoss`."""

    objective: str
    beta: float
    gamma: float = 0.0

    @classmethod
    def from_spec(cls, spec: FineTuneJobSpec) -> PreferenceLoss:
        objective = spec.objective
        assert objective is not None and spec.is_preference
        return cls(spec.objective_type, float(objective.beta or 0.0), float(objective.gamma or 0.0))

    @property
    def needs_reference(self) -> bool:
        return self.objective == DPO

    def terms(self, model: Any, batch: Batch) -> dict[str, torch.Tensor]:
        """Per pair: loss, chosen/rejected rewards and mean token log-probs (a forward pass of ``model``)."""
        logps, tokens = _forward_logps(model, batch)
        pairs = logps.shape[0] // 2
        chosen, rejected, chosen_n, rejected_n = logps[:pairs], logps[pairs:], tokens[:pairs], tokens[pairs:]
        if self.objective == DPO:
            if "ref_logps" not in batch:
                raise RuntimeError("objective dpo needs the reference log-probabilities in every batch (attach_reference)")
            ref = batch["ref_logps"].to(logps.dtype)
            losses, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, ref[:, 0], ref[:, 1], self.beta)
        else:
            losses, chosen_rewards, rejected_rewards = simpo_loss(chosen, chosen_n, rejected, rejected_n, self.beta, self.gamma)
        return {"loss": losses, "chosen_rewards": chosen_rewards, "rejected_rewards": rejected_rewards,
                "chosen_mean_logp": chosen / chosen_n.clamp(min=1), "rejected_mean_logp": rejected / rejected_n.clamp(min=1)}

    def local_total(self, batches: list[Batch]) -> float:
        return float(sum(int(b["input_ids"].shape[0]) // 2 for b in batches))

    def denominator(self, batches: list[Batch]) -> float:
        """The window's pairs over all ranks / world size (a collective, like WindowLoss.denominator)."""
        total = distributed.all_reduce_sum(self.local_total(batches))
        return (total or 1.0) / distributed.world_size()

    def __call__(self, model: Any, batch: Batch, denominator: float) -> torch.Tensor:
        return self.terms(model, batch)["loss"].sum() / denominator


# ---------------------------------------------------------------------------------------- the reference


@torch.no_grad()
def reference_logps(model: Any, dataset: datasets.Dataset, *, batch_size: int, pad_token_id: int, device: torch.device,
                    is_adapter: bool, accelerator: Accelerator | None = None) -> torch.Tensor:
    """[rows, 2] summed response log-probabilities (chosen, rejected) of the base model, rows in order."""
    loader = eval_loader(dataset, batch_size=batch_size, pad_token_id=pad_token_id)
    out: list[torch.Tensor] = []
    was_training = model.training
    model.eval()
    base = model.disable_adapter() if is_adapter else contextlib.nullcontext()
    autocast = accelerator.autocast() if accelerator is not None else contextlib.nullcontext()
    try:
        with base, autocast:
            for batch in loader or []:
                logps, _ = _forward_logps(model, {k: v.to(device) for k, v in batch.items()})
                pairs = logps.shape[0] // 2
                out.append(torch.stack([logps[:pairs], logps[pairs:]], dim=1).double().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, 2, dtype=torch.float64)


def attach_reference(data: Any, model: Any, *, batch_size: int, pad_token_id: int, device: torch.device, is_adapter: bool,
                     accelerator: Accelerator | None = None) -> None:
    """Add the reference columns to ``data``'s train, validation and test sets (in place on the PreparedData)."""
    for name in ("train", "validation", "test"):
        dataset = getattr(data, name)
        if dataset is None or len(dataset) == 0:
            continue
        ref = reference_logps(model, dataset, batch_size=batch_size, pad_token_id=pad_token_id, device=device,
                              is_adapter=is_adapter, accelerator=accelerator)
        for i, column in enumerate(REFERENCE_COLUMNS):
            dataset = dataset.add_column(column, ref[:, i].tolist())
        setattr(data, name, dataset)
        log.info("reference log-probabilities of %d %s pairs computed with the base model", len(dataset), name)


# --------------------------------------------------------------------------------------------- metrics


@torch.no_grad()
def evaluate_preference(model: torch.nn.Module, dataloader: Iterable[Mapping[str, torch.Tensor]], loss: PreferenceLoss, *,
                        accelerator: Accelerator | None = None) -> dict[str, float]:
    """The pair metrics of ``dataloader`` (exact across ranks: per-pair rows gathered, divided once)."""
    from .errors import EmptyDataset
    from .evaluate import EvalMode, _gather, _to_device, device_of

    device = device_of(model, accelerator)
    sums = torch.zeros(6, dtype=torch.float64)
    pairs = 0
    with EvalMode(model):
        for batch in dataloader:
            t = loss.terms(model, _to_device(batch, device))
            rows = torch.stack([
                t["loss"].double(), t["chosen_rewards"].double(), t["rejected_rewards"].double(),
                (t["chosen_rewards"] > t["rejected_rewards"]).double(), (t["chosen_mean_logp"] > t["rejected_mean_logp"]).double(),
                (t["chosen_rewards"] - t["rejected_rewards"]).double(),
            ], dim=1)
            rows = _gather(accelerator, rows).to("cpu", torch.float64)
            sums += rows.sum(dim=0)
            pairs += rows.shape[0]
    if pairs == 0:
        raise EmptyDataset("the evaluation set has no preference pairs")
    mean = (sums / pairs).tolist()
    return {"eval_loss": mean[0], "reward_accuracy": mean[3], "reward_margin": mean[5], "chosen_reward": mean[1],
            "rejected_reward": mean[2], "logp_accuracy": mean[4], "eval_pairs": float(pairs)}


def base_model_metrics(spec: FineTuneJobSpec, metrics: dict[str, Any]) -> dict[str, Any]:
    """The base model's row of the baseline report. Under dpo the policy at step 0 *is* the reference, so every
    reward is 0 by construction and the loss is log 2: those are left out, not reported as a baseline. What stays
    (logp_accuracy, and for simpo its rewards, which need no reference) is what the base model itself prefers."""
    if spec.objective_type != DPO:
        return metrics
    trivial = {"eval_loss", "reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward"}
    return {k: v for k, v in metrics.items() if k not in trivial}


def objective_words(spec: FineTuneJobSpec) -> str:
    """The model card's line for the objective."""
    objective = spec.objective
    assert objective is not None
    if spec.objective_type == DPO:
        return (f"DPO, beta={objective.beta:g}; reference: the base model ("
                + ("adapter disabled" if spec.is_adapter else "its weights before training") + "), log-probs computed before training")
    return f"SimPO (reference-free), beta={objective.beta:g}, gamma={objective.gamma:g}"
