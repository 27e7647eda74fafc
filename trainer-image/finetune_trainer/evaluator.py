"""The model over the evaluation sets, for the loop's evaluations, the baseline and the final report.

:mod:`.evaluate` holds the metric arithmetic; :class:`Evaluator` is the glue that feeds it: padded,
unshuffled loaders (sharded across ranks under DDP, the metrics gathered exactly), autocast, and the
greedy completions BLEU/ROUGE are scored on. Every method is a collective under DDP/FSDP except
:meth:`Evaluator.generation_metrics` (rank 0 only, every rank under FSDP).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from finetune_api import metric_catalogue
from finetune_api.spec import FineTuneJobSpec

from .collate import eval_loader
from .distributed import DistInfo

if TYPE_CHECKING:
    import datasets
    from accelerate import Accelerator
    from torch.utils.data import DataLoader
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from .data.prepare import PreparedData

log = logging.getLogger(__name__)


class Evaluator:
    def __init__(self, spec: FineTuneJobSpec, dist: DistInfo, *, accelerator: Accelerator, tokenizer: PreTrainedTokenizerBase,
                 data: PreparedData, num_labels: int | None, model: PreTrainedModel, sharded: bool):
        self.spec, self.hp, self.dist = spec, spec.hyperparameters, dist
        self.accelerator, self.tokenizer, self.data, self.num_labels = accelerator, tokenizer, data, num_labels
        self.model = model  # unwrapped; a restored checkpoint changes its weights in place
        self.sharded = sharded  # FSDP: every forward is a collective
        self.classification = spec.is_classification
        self.generation = [m for m in (spec.evaluation.metrics or []) if m in metric_catalogue.GENERATION_METRICS]
        self.validation = self.loader(data.validation, max_samples=spec.evaluation.max_eval_samples)

    def loader(self, dataset: datasets.Dataset | None, max_samples: int | None = None) -> DataLoader | None:
        """Padded eval batches; under DDP each rank takes a shard and the metrics are gathered (exactly, see evaluate)."""
        loader = eval_loader(dataset, classification=self.classification, batch_size=self.hp.batch_size,
                             pad_token_id=self.tokenizer.pad_token_id, max_samples=max_samples)
        if loader is not None and self.dist.distributed:
            loader = self.accelerator.prepare(loader)  # no sampler generator: does not touch any RNG
        return loader

    def retention_loader(self) -> DataLoader | None:
        if self.spec.evaluation.retention is None or getattr(self.data, "retention", None) is None:
            return None
        return self.loader(self.data.retention, max_samples=self.spec.evaluation.max_eval_samples)

    def evaluate(self, loader: DataLoader | None = None, **kwargs: Any) -> dict[str, Any]:
        """Metrics of ``loader`` (the validation set by default); every rank gets the same, global result."""
        from .evaluate import evaluate_classification, evaluate_lm

        loader = loader if loader is not None else self.validation
        accelerator = self.accelerator if self.dist.distributed else None
        with self.accelerator.autocast():
            if self.classification:
                return evaluate_classification(self.model, loader, num_labels=self.num_labels, label_names=self.data.labels,
                                               accelerator=accelerator, **kwargs)
            return evaluate_lm(self.model, loader, accelerator=accelerator)

    def generation_metrics(self, dataset: datasets.Dataset | None, limit: int) -> dict[str, float] | None:
        """BLEU / ROUGE-L of greedy completions on up to ``limit`` rows of ``dataset`` (evaluation.metrics).

        Rank 0 only (every rank under FSDP, where each forward is a collective).
        """
        wanted = self.generation
        if self.classification or not wanted or dataset is None or not (self.dist.is_main or self.sharded):
            return None
        from .generation import generate_and_score, prompts_and_references

        prompts, references = prompts_and_references(dataset.select(range(min(limit, len(dataset)))), self.tokenizer)
        if not prompts:
            log.warning("evaluation.metrics %s need prompt/completion or chat rows; skipped", wanted)
            return None
        with self.accelerator.autocast():
            scores = generate_and_score(self.model, self.tokenizer, prompts, references, metrics=wanted,
                                        max_new_tokens=min(128, self.hp.max_seq_length), batch_size=self.hp.batch_size)
        log.info("generation metrics on %d %s prompts: %s", len(prompts), "test" if dataset is self.data.test else "validation", scores)
        return scores
