"""Stage 3: rows -> batches.

Two concerns live here:

* **Order.** Which rows form micro-batch ``b`` of epoch ``e`` on rank ``r`` is a pure function of
  (seed, epoch, b, rank, world size): a seeded permutation per epoch, cut into global micro-batches of
  ``batch_size * world_size`` rows, each rank taking its slice. Resume therefore needs only
  (epoch, batch index) to skip exactly the consumed batches — no sampler state to save.
* **Shape.** Causal LM with ``hyperparameters.packing`` uses transformers' padding-free
  :class:`~transformers.DataCollatorWithFlattening`: the micro-batch's rows are concatenated into one
  sequence with ``position_ids`` restarting at 0 for every row and no attention mask. Since
  transformers 5 the mask builder (``masking_utils.find_packed_sequence_indices``) turns those
  position ids into a block-diagonal causal mask for eager/sdpa (and varlen kernels for flash
  attention), so attention never crosses rows and no compute goes to pad tokens. The first label of
  every row is -100, so no row is trained to predict the next row's start. Without packing (and for
  classification) rows are padded to the longest in the micro-batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

# The one label of a token that is not scored, defined where labels are made; loss and evaluate take it from here.
from finetune_trainer.data.tokenize import IGNORE_INDEX

if TYPE_CHECKING:
    import datasets



# ------------------------------------------------------------------------------------------- order


def epoch_permutation(num_rows: int, seed: int, epoch: int) -> list[int]:
    """The shuffled row order of one epoch; the same (seed, epoch) always gives the same order."""
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    return torch.randperm(num_rows, generator=g).tolist()


@dataclass(frozen=True)
class Batching:
    """How an epoch is cut into micro-batches for this rank."""

    num_rows: int
    batch_size: int
    world_size: int = 1
    rank: int = 0
    seed: int = 42

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    @property
    def batches_per_epoch(self) -> int:
        """Micro-batches per epoch (the same on every rank)."""
        return max(1, math.ceil(self.num_rows / self.global_batch))

    def _order(self, epoch: int) -> list[int]:
        order = epoch_permutation(self.num_rows, self.seed, epoch)
        if self.world_size > 1:
            # Like DistributedSampler: wrap around so every rank gets a full, equal share.
            need = self.batches_per_epoch * self.global_batch
            order = (order * math.ceil(need / max(len(order), 1)))[:need]
        return order

    def _slice(self, order: list[int], batch: int) -> list[int]:
        start = batch * self.global_batch + self.rank * self.batch_size
        return order[start : start + self.batch_size]

    def rows(self, epoch: int, batch: int) -> list[int]:
        """Row indices of micro-batch ``batch`` of ``epoch`` on this rank."""
        return self._slice(self._order(epoch), batch)

    def epoch_batches(self, epoch: int, start_batch: int = 0) -> list[list[int]]:
        """This rank's micro-batches of ``epoch`` from ``start_batch`` on (resume skips the consumed ones)."""
        order = self._order(epoch)
        return [self._slice(order, b) for b in range(start_batch, self.batches_per_epoch)]


# ------------------------------------------------------------------------------------------- shape


def _pad(seqs: list[list[int]], value: int, max_len: int | None = None) -> torch.Tensor:
    n = max_len or max((len(s) for s in seqs), default=0)
    out = torch.full((len(seqs), n), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.as_tensor(s[:n], dtype=torch.long)
    return out


class PaddedLMCollator:
    """Causal LM rows padded to the longest in the batch (pad labels are -100, attention_mask 0)."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = int(pad_token_id)

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids = [list(r["input_ids"]) for r in rows]
        labels = [list(r["labels"]) if "labels" in r else list(r["input_ids"]) for r in rows]
        input_ids = _pad(ids, self.pad_token_id)
        return {
            "input_ids": input_ids,
            "attention_mask": _pad([[1] * len(s) for s in ids], 0),
            "labels": _pad(labels, IGNORE_INDEX),
        }


class PackedLMCollator:
    """Padding-free packing via transformers' DataCollatorWithFlattening (one row of all tokens)."""

    def __init__(self) -> None:
        from transformers import DataCollatorWithFlattening

        self._flatten = DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        feats = [
            {"input_ids": list(r["input_ids"]), "labels": list(r["labels"]) if "labels" in r else list(r["input_ids"])}
            for r in rows
        ]
        batch = self._flatten(feats, return_tensors="pt")
        return {k: batch[k] for k in ("input_ids", "labels", "position_ids")}


class ClassificationCollator:
    """Rows padded to the longest; the ``label`` column becomes ``labels``."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = int(pad_token_id)

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids = [list(r["input_ids"]) for r in rows]
        return {
            "input_ids": _pad(ids, self.pad_token_id),
            "attention_mask": _pad([[1] * len(s) for s in ids], 0),
            "labels": torch.tensor([int(r["label"]) for r in rows], dtype=torch.long),
        }


Collator = ClassificationCollator | PackedLMCollator | PaddedLMCollator
"""What turns a list of rows into one batch of tensors."""


def make_collator(*, classification: bool, packing: bool, pad_token_id: int) -> Collator:
    if classification:
        return ClassificationCollator(pad_token_id)
    if packing:
        return PackedLMCollator()
    return PaddedLMCollator(pad_token_id)


def token_counts(batch: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(real tokens, tokens computed on) of a collated batch; their ratio gives the padding fraction."""
    total = int(batch["input_ids"].numel())
    real = int(batch["attention_mask"].sum()) if "attention_mask" in batch else total
    return real, total


def padding_fraction(batch: dict[str, torch.Tensor]) -> float:
    real, total = token_counts(batch)
    return 0.0 if total == 0 else 1.0 - real / total


def label_tokens(batch: dict[str, torch.Tensor], *, shift: bool = True) -> int:
    """Tokens the LM loss is computed on (a causal LM's labels shift by one inside the model; with ``shift`` False,
    an encoder-decoder's, every label)."""
    return int(((batch["labels"][..., 1:] if shift else batch["labels"]) != IGNORE_INDEX).sum())


# ------------------------------------------------------------------------------------- loading rows


def rows_of(dataset: datasets.Dataset, indices: list[int]) -> list[dict[str, Any]]:
    """Rows ``indices`` of an Arrow dataset as dicts (one columnar read instead of one per row)."""
    cols = dataset[indices]
    keys = list(cols)
    return [{k: cols[k][i] for k in keys} for i in range(len(indices))]


class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, dataset: datasets.Dataset, columns: list[str]):
        self.dataset = dataset
        self.columns = [c for c in columns if c in dataset.column_names]

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = self.dataset[int(i)]
        return {c: row[c] for c in self.columns}


def eval_loader(dataset: datasets.Dataset | None, *, classification: bool, batch_size: int, pad_token_id: int,
                max_samples: int | None = None, collate: Any = None) -> torch.utils.data.DataLoader | None:
    """Padded, unshuffled batches of ``dataset`` (None when there is nothing to evaluate); ``collate`` overrides
    the collator (an encoder-decoder's, :class:`.seq2seq.Seq2SeqCollator`)."""
    if dataset is None or len(dataset) == 0:
        return None
    if max_samples is not None and len(dataset) > max_samples:
        dataset = dataset.select(range(max_samples))
    if collate is None:
        collate = ClassificationCollator(pad_token_id) if classification else PaddedLMCollator(pad_token_id)
    cols = ["input_ids", "label"] if classification else ["input_ids", "labels"]
    return torch.utils.data.DataLoader(_ListDataset(dataset, cols), batch_size=batch_size, shuffle=False, collate_fn=collate)
