"""Knowledge distillation (``spec.distillation``): the teacher, what it must share with the student, and the
distillation term of the loss.

The loss of one loss unit (a completion token for causal-lm, a row for sequence-classification) is

    (1 - alpha) * task_loss + alpha * T^2 * KL(p_teacher || p_student),    p = softmax(logits / T)

with ``KL(p || q) = sum_v p_v (log p_v - log q_v)``. The issue writes "KL(student ‖ teacher)"; read as
notation it would be the reverse (mode-seeking) divergence, but what it describes is Hinton et al.'s
distillation, whose term is the cross-entropy of the student's softened distribution against the
teacher's soft targets, i.e. ``KL(p_teacher || p_student)`` up to the teacher's entropy (a constant for
the student). That forward KL is what is implemented (``torch.nn.functional.kl_div`` with the teacher as
target): every class / token the teacher gives mass to pulls the student. The reverse KL is not offered.
``T^2`` keeps the term's gradients the same size whatever the temperature (the soft gradients scale as
``1 / T^2``).

Exactness: :class:`~.loss.WindowLoss` divides every micro-batch's *sum* over loss units by the global
denominator; :meth:`Teacher.mix` returns the mixed sum over the same units (a causal LM's KL is summed
over exactly the positions whose next-token label is not ``IGNORE_INDEX``; a classifier's per-row KL
takes the row's class weight when ``preprocessing.classWeights`` is on, like its cross-entropy), so the
step is the exact mean over the global batch under gradient accumulation, DDP and FSDP.

The teacher reads the student's token ids: both must share one tokenizer (the data is tokenised once,
with the student's). Refused with InvalidConfig: a different vocabulary (either task), a classifier
teacher with other labels or another label order, a teacher without trained weights for the task (an
encoder without a classification head, an adapter folder) and a causal-LM teacher whose logits do not
cover the tokenizer. Every process holds a whole copy of the teacher in ``distillation.teacher.precision``
on its device (not sharded under FSDP), in eval mode, ``requires_grad`` off, its forward under
``torch.no_grad()`` (not ``inference_mode``: its logits are the KL's target, which autograd saves) and
outside autocast, so it runs in its own precision. It holds no dropout and draws no random numbers, so
exact resume is untouched.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from finetune_api.spec import FineTuneJobSpec

from .collate import IGNORE_INDEX
from .errors import InvalidConfig, ModelNotFound
from .model import DTYPES, resolve_model_dir, resolve_precision

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from .distributed import DistInfo
    from .evaluator import Evaluator
    from .storage import Storage

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]


# ------------------------------------------------------------------------------------------ the term


def kl_per_unit(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))`` over the last dimension, one value per row / position."""
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="none").sum(-1) * temperature**2


def distillation_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, *, classification: bool,
                     temperature: float, class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """The KD term summed over the batch's loss units: the rows (weighted by their class weight when given) of a
    classifier, or the positions of a causal LM whose next-token label is a loss token (the task loss's own mask)."""
    if classification:
        per_row = kl_per_unit(student_logits, teacher_logits, temperature)
        return (per_row * class_weights[labels]).sum() if class_weights is not None else per_row.sum()
    keep = labels[..., 1:] != IGNORE_INDEX
    per_position = kl_per_unit(student_logits[..., :-1, :], teacher_logits[..., :-1, :], temperature)
    return per_position[keep].sum()


# ------------------------------------------------------------------------------------------ the teacher


@dataclass
class Teacher:
    model: PreTrainedModel  # eval mode, no gradients, on the training device
    uri: str
    precision: str  # bf16 / fp16 / fp32, the dtype of its weights and its forward
    temperature: float
    alpha: float
    vocab: int | None = None  # causal LM: compare the first `vocab` logits (the shared tokenizer's ids) when the heads differ in size

    @torch.no_grad()
    def logits(self, inputs: dict[str, Any]) -> torch.Tensor:
        device_type = inputs["input_ids"].device.type
        with torch.autocast(device_type=device_type, enabled=False):
            return self.model(**inputs).logits.float()

    def mix(self, task_sum: torch.Tensor, student_logits: torch.Tensor, inputs: dict[str, Any], labels: torch.Tensor, *,
            classification: bool, class_weights: torch.Tensor | None = None) -> torch.Tensor:
        """``(1 - alpha) * task_sum + alpha * KD sum`` over the same loss units (a teacher forward pass)."""
        if self.alpha == 0.0:
            return task_sum
        teacher_logits = self.logits(inputs)
        student = student_logits
        if self.vocab is not None:
            student, teacher_logits = student[..., : self.vocab], teacher_logits[..., : self.vocab]
        kd = distillation_sum(student, teacher_logits, labels, classification=classification, temperature=self.temperature,
                              class_weights=class_weights)
        return (1.0 - self.alpha) * task_sum + self.alpha * kd


def vocabulary_hash(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 of the (token, id) pairs, added tokens included: equal hashes mean the same ids for the same strings."""
    items = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    return hashlib.sha256("\n".join(f"{i}\t{t}" for t, i in items).encode()).hexdigest()


def check_tokenizers(student: PreTrainedTokenizerBase, teacher: PreTrainedTokenizerBase, *, student_uri: str, teacher_uri: str) -> None:
    s, t = student.get_vocab(), teacher.get_vocab()
    if s == t:
        return
    differ = sum(1 for tok, i in s.items() if t.get(tok) != i) + sum(1 for tok in t if tok not in s)
    raise InvalidConfig(
        f"distillation.teacher.uri {teacher_uri} has another tokenizer than model.uri {student_uri} ({len(t)} vs {len(s)} tokens, "
        f"{differ} token ids differ; vocabulary sha256 {vocabulary_hash(teacher)[:12]} vs {vocabulary_hash(student)[:12]}): the teacher "
        "reads the student's token ids, so both must share one tokenizer; pick a teacher of the student's model family "
        "(distillation across tokenizers is not supported)"
    )


def check_labels(teacher_config: Any, labels: list[str] | None, num_labels: int | None, *, teacher_uri: str) -> None:
    """A classifier teacher must predict the student's classes in the student's order."""
    got = int(getattr(teacher_config, "num_labels", 0) or 0)
    names = [str(teacher_config.id2label[i]) for i in range(got)] if getattr(teacher_config, "id2label", None) and got else []
    want = list(labels) if labels else [str(i) for i in range(num_labels or 0)]
    if got != len(want):
        raise InvalidConfig(
            f"distillation.teacher.uri {teacher_uri} predicts {got} classes ({', '.join(names)}) but the student has {len(want)} "
            f"({', '.join(want)}): the teacher must be a classifier fine-tuned on the same labels"
        )
    if labels and names != want:
        raise InvalidConfig(
            f"distillation.teacher.uri {teacher_uri} has labels [{', '.join(names)}] in id order, the student [{', '.join(want)}]: "
            "both must list the same labels in the same order (set model.labels to the teacher's order)"
        )


def resolve_teacher_precision(requested: str) -> str:
    try:
        return resolve_precision(requested)
    except Exception as e:  # noqa: BLE001 - UnsupportedHardware, worded for the teacher
        raise type(e)(str(e).replace("precision", "distillation.teacher.precision", 1)) from None


def load_teacher(spec: FineTuneJobSpec, storage: Storage, dist: DistInfo, *, student_tokenizer: PreTrainedTokenizerBase,
                 student_model: PreTrainedModel, labels: list[str] | None, num_labels: int | None, device: torch.device,
                 cache_dir: str | None = None) -> Teacher:
    """The teacher of ``spec.distillation``, checked against the student, frozen, on ``device``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    distillation = spec.distillation
    assert distillation is not None
    uri, classification, trust = distillation.teacher.uri, spec.is_classification, spec.model.trust_remote_code
    if uri is None:  # the operator replaces fromJob by the model it resolved to (status.teacherUri)
        raise InvalidConfig(f"distillation.teacher.fromJob {distillation.teacher.from_job.name if distillation.teacher.from_job else ''!r} is "
                            "resolved by the operator; outside the operator set distillation.teacher.uri instead")
    precision = resolve_teacher_precision(distillation.teacher.precision)
    try:
        teacher_dir = resolve_model_dir(uri, storage, dist, cache_dir=cache_dir)
    except ModelNotFound as e:
        raise ModelNotFound(f"distillation.teacher.uri: {e.message} (the teacher needs full weights: an adapter folder is not enough, "
                            "use the model/merged folder of a job with output.mergeAdapter)") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(teacher_dir, trust_remote_code=trust)
        config = AutoConfig.from_pretrained(teacher_dir, trust_remote_code=trust)
    except Exception as e:  # noqa: BLE001
        raise ModelNotFound(f"cannot load the teacher's tokenizer or config from {uri}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__}") from None
    check_tokenizers(student_tokenizer, tokenizer, student_uri=spec.model.uri, teacher_uri=uri)
    if classification:
        architectures = list(getattr(config, "architectures", None) or [])
        if architectures and not any(a.endswith("ForSequenceClassification") for a in architectures):
            raise InvalidConfig(
                f"distillation.teacher.uri {uri} is a {', '.join(architectures)}, not a sequence classifier: the teacher must be a "
                "classifier already fine-tuned on these labels (e.g. the model/ folder of a full sequence-classification job)"
            )
        check_labels(config, labels, num_labels, teacher_uri=uri)
    auto = AutoModelForSequenceClassification if classification else AutoModelForCausalLM
    try:
        model, info = auto.from_pretrained(teacher_dir, dtype=DTYPES[precision], trust_remote_code=trust, output_loading_info=True)
    except Exception as e:  # noqa: BLE001
        raise ModelNotFound(f"cannot load the teacher from {uri}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__}") from None
    missing = list(info.get("missing_keys") or [])
    if missing:
        task = "sequence-classification (a classifier fine-tuned on these labels)" if classification else "causal-lm"
        raise InvalidConfig(
            f"distillation.teacher.uri {uri} has no trained weights for {len(missing)} parameters of a {task} model "
            f"(e.g. {', '.join(sorted(missing)[:3])}): a teacher must already do the task, it is never trained here"
        )
    model.eval().requires_grad_(False).to(device)
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    vocab = None
    if not classification:
        vocab = _shared_logits(model, student_model, len(student_tokenizer), teacher_uri=uri)
        if spec.hyperparameters.packing:
            from .attention import use_per_document_sdpa

            use_per_document_sdpa(model)  # packed rows: the teacher must keep attention inside each row too
    log.info("teacher %s: %d parameters in %s on %s, temperature %g, alpha %g", uri, sum(p.numel() for p in model.parameters()),
             precision, device, distillation.temperature, distillation.alpha)
    return Teacher(model, uri, precision, distillation.temperature, distillation.alpha, vocab)


def _shared_logits(teacher: Any, student: Any, tokens: int, *, teacher_uri: str) -> int | None:
    """None when both heads have one size; else the tokenizer's size, if both heads cover it (heads padded for speed)."""
    t, s = teacher.get_output_embeddings().weight.shape[0], student.get_output_embeddings().weight.shape[0]
    if t == s:
        return None
    if min(t, s) < tokens:
        raise InvalidConfig(
            f"distillation.teacher.uri {teacher_uri} has {t} output logits and the student {s}, fewer than the {tokens} tokens of "
            "their shared tokenizer: the two models' outputs cannot be compared token for token"
        )
    return tokens


# ---------------------------------------------------------------------------------------- the report


def teacher_metrics(evaluator: Evaluator, teacher: Teacher) -> dict[str, Any]:
    """The teacher on the student's validation rows (maxEvalSamples) and test set, measured once, at T = 1, in its
    own precision: ``{"uri", "precision", "temperature", "alpha", "validation", "test"}``. A collective under DDP/FSDP."""
    from .evaluate import evaluate_classification, evaluate_lm
    from .report import public

    accelerator = evaluator.accelerator if evaluator.dist.distributed else None

    def measure(loader: Any) -> dict[str, Any] | None:
        if loader is None:
            return None
        if evaluator.classification:
            return public(evaluate_classification(teacher.model, loader, num_labels=evaluator.num_labels,
                                                  label_names=evaluator.data.labels, accelerator=accelerator))
        return public(evaluate_lm(teacher.model, loader, accelerator=accelerator))

    result = {"uri": teacher.uri, "precision": teacher.precision, "temperature": teacher.temperature, "alpha": teacher.alpha,
              "validation": measure(evaluator.validation), "test": measure(evaluator.loader(evaluator.data.test))}
    log.info("teacher on test: %s", {k: round(v, 4) for k, v in (result["test"] or {}).items() if isinstance(v, float)})
    return result
