"""The model over the evaluation sets, for the loop's evaluations, the baseline and the final report.

:mod:`.evaluate` holds the metric arithmetic; :class:`Evaluator` is the glue that feeds it: padded,
unshuffled loaders (sharded across ranks under DDP, the metrics gathered exactly), autocast, the
greedy completions BLEU/ROUGE are scored on (a seeded sample of prompt token ids, optionally k-shot) and
the linear probe on frozen features. Every method is a collective under DDP/FSDP except
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
    from .generation import FewShot

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
        self._samples: dict[tuple[int, int, int], tuple[list[list[int]], list[str]]] = {}  # generation_sample, per set

    def loader(self, dataset: datasets.Dataset | None, max_samples: int | None = None) -> DataLoader | None:
        """Padded eval batches; under DDP each rank takes a shard and the metrics are gathered (exactly, see evaluate)."""
        if self.spec.is_preference:
            from .preference import eval_loader as pair_loader

            loader = pair_loader(dataset, batch_size=self.hp.batch_size, pad_token_id=self.tokenizer.pad_token_id, max_samples=max_samples)
        else:
            collate = None
            if self.spec.is_seq2seq:
                from .seq2seq import Seq2SeqCollator, decoder_inputs_of

                collate = Seq2SeqCollator(self.tokenizer.pad_token_id, decoder_inputs_of(self.model))
            loader = eval_loader(dataset, classification=self.classification, batch_size=self.hp.batch_size,
                                 pad_token_id=self.tokenizer.pad_token_id, max_samples=max_samples, collate=collate)
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
            if self.spec.is_preference:
                from .preference import PreferenceLoss, evaluate_preference

                return evaluate_preference(self.model, loader, PreferenceLoss.from_spec(self.spec), accelerator=accelerator)
            if self.classification:
                return evaluate_classification(self.model, loader, num_labels=self.num_labels, label_names=self.data.labels,
                                               accelerator=accelerator, **kwargs)
            return evaluate_lm(self.model, loader, accelerator=accelerator, shift=not self.spec.is_seq2seq)

    def generation_sample(self, dataset: datasets.Dataset, limit: int) -> tuple[list[list[int]], list[str]]:
        """The prompt ids and references of the rows BLEU/ROUGE are scored on: a seeded sample of up to ``limit``
        rows (hyperparameters.seed; stratified by reference when the completions are labels), the same rows at
        every evaluation and for every model (fine-tuned and baselines)."""
        from .generation import prompts_and_references, sample_rows

        key = (id(dataset), len(dataset), limit)
        if key not in self._samples:
            prompts, references = prompts_and_references(dataset, self.tokenizer)
            chosen = sample_rows(references, limit, self.hp.seed) if prompts else []
            self._samples[key] = ([prompts[i] for i in chosen], [references[i] for i in chosen])
        return self._samples[key]

    def few_shot(self) -> FewShot | None:
        """The k-shot demonstrations of the base-model baseline (evaluation.fewShotExamples training rows); None for
        seq2seq-lm, whose baseline is the base model alone (in-context demonstrations are a decoder-only practice)."""
        from .generation import FewShot

        if self.spec.is_seq2seq:
            return None
        return FewShot.from_train(self.data.train, self.tokenizer, k=self.spec.evaluation.few_shot_examples, seed=self.hp.seed,
                                  keep_eos=getattr(self.spec.dataset.format, "value", self.spec.dataset.format) == "chat")

    def generation_metrics(self, dataset: datasets.Dataset | None, limit: int, few_shot: FewShot | None = None) -> dict[str, float] | None:
        """BLEU / ROUGE-L of greedy completions on a seeded sample of up to ``limit`` rows of ``dataset``
        (evaluation.metrics); with ``few_shot``, of the k-shot prompts built from those rows.

        Rank 0 only (every rank under FSDP, where each forward is a collective).
        """
        wanted = self.generation
        if self.classification or not wanted or dataset is None or not (self.dist.is_main or self.sharded):
            return None
        from .generation import generate_and_score

        prompts, references = self.generation_sample(dataset, limit)
        if not prompts:
            log.warning("evaluation.metrics %s need prompt/completion or chat rows; skipped", wanted)
            return None
        settings = self.spec.evaluation.generation
        max_new_tokens = min(settings.max_new_tokens, self.hp.max_seq_length)
        rouge_types = ("rouge1", "rouge2", "rougeL") if self.spec.is_seq2seq else ("rougeL",)
        shortened = 0
        if few_shot is not None:
            built = [few_shot.prompt(p, max_length=self.hp.max_seq_length) for p in prompts]
            prompts = [ids for ids, _ in built]
            shortened = sum(1 for _, used in built if used < few_shot.k)
        with self.accelerator.autocast():
            scores = generate_and_score(self.model, self.tokenizer, prompts, references, metrics=wanted,
                                        max_new_tokens=max_new_tokens, batch_size=self.hp.batch_size,
                                        num_beams=settings.num_beams, rouge_types=rouge_types)
        if few_shot is not None:
            scores["prompts_shortened"] = float(shortened)  # k-shot prompts cut to fit maxSeqLength
        log.info("generation metrics on %d %s prompts%s: %s", len(prompts), "test" if dataset is self.data.test else "validation",
                 f" ({few_shot.k}-shot)" if few_shot is not None else "", scores)
        return scores

    def linear_probe(self, dataset: datasets.Dataset) -> dict[str, Any] | None:
        """The linear-probe baseline on ``dataset``: logistic regression on the model's frozen, mean-pooled features
        of a seeded sample of up to LINEAR_PROBE_MAX_TRAIN training rows. Call it before training (the features
        must be the base encoder's). A collective under DDP/FSDP; every rank fits the same probe on the same
        gathered features."""
        import random

        from .evaluate import LINEAR_PROBE_MAX_TRAIN, frozen_features, linear_probe

        train = self.data.train
        if len(train) > LINEAR_PROBE_MAX_TRAIN:
            train = train.select(sorted(random.Random(self.hp.seed).sample(range(len(train)), LINEAR_PROBE_MAX_TRAIN)))
        accelerator = self.accelerator if self.dist.distributed else None
        with self.accelerator.autocast():
            x_train, y_train = frozen_features(self.model, self.loader(train), accelerator=accelerator)
            x_eval, y_eval = frozen_features(self.model, self.loader(dataset), accelerator=accelerator)
        names = self.data.labels or [str(i) for i in range(self.num_labels)]
        return linear_probe(x_train, y_train, x_eval, y_eval, names, seed=self.hp.seed)
