"""The FineTuneJob spec: the single source of truth.

The CRD schema in ``crds/`` is generated from these models (``make crds``), the operator parses every
custom resource body into :class:`FineTuneJobSpec`, and the trainer reads the same model from the
rendered config. Cross-field rules live twice on purpose: as pydantic validators (so the trainer run
locally and the operator reject bad input with the same words) and as CEL rules in
``x-kubernetes-validations`` (so the API server rejects it before anything is stored). A unit test
checks that the two agree on a table of bad specs.
"""

from __future__ import annotations

from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel
from pydantic.json_schema import JsonDict

from finetune_api import metric_catalogue

API_GROUP = "finetune.io"
API_VERSION = "v1alpha1"
KIND = "FineTuneJob"
PLURAL = "finetunejobs"
SINGULAR = "finetunejob"
SHORT_NAMES = ["ftj"]

# Patterns are also emitted into the CRD, so they use the RE2 subset the API server understands.
S3_URI = r"^s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?$"
MODEL_URI = r"^(s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?|hf://[A-Za-z0-9][A-Za-z0-9._\-]*/[A-Za-z0-9._\-]+|/.+)$"
DATA_URI = r"^(s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?|/.+)$"
OUTPUT_URI = DATA_URI
K8S_NAME = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"

MAX_STR = 1024
MAX_LIST = 64
MAX_NODES = 1024

# metadata.name bounds, so that every name derived from it fits the API server's limits (issue 9 §4:
# a child the server rejects must be refused at admission instead). The longest derived name is a
# training pod's hostname, ``<name>-<attempt>-<completion index>``, a DNS label of at most 63
# characters (finetune_operator.builders names the Job ``<name>-<attempt>``); attempts are reserved
# up to 5 digits, indexes up to ``MAX_NODES - 1``. The headless Service is ``<name>``, a DNS-1035
# label, so the name must start with a letter and hold no dots.
DNS_LABEL_MAX = 63
MAX_ATTEMPT_DIGITS = 5
MAX_NAME_LENGTH = DNS_LABEL_MAX - len("-") - MAX_ATTEMPT_DIGITS - len("-") - len(str(MAX_NODES - 1))
NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
METADATA_NAME_SCHEMA: dict[str, Any] = {
    "type": "string",
    "maxLength": MAX_NAME_LENGTH,
    "pattern": NAME_PATTERN,
    "description": (
        f"At most {MAX_NAME_LENGTH} characters, lowercase letters, digits and '-', starting with a letter: the "
        "training pods' hostnames (<name>-<attempt>-<index>) and the headless Service (<name>) are derived from it."
    ),
}
LABEL_VALUE_MAX = 63
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"


def cel(rule: str, message: str, **extra: Any) -> dict[str, Any]:
    """One ``x-kubernetes-validations`` entry."""
    return {"rule": rule, "message": message, **extra}


class _Model(BaseModel):
    """Base: camelCase on the wire, snake_case in Python, unknown fields rejected, immutable."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        use_enum_values=True,
        validate_default=True,  # so defaults become plain values too (use_enum_values skips unvalidated defaults)
    )

    def wire(self) -> dict[str, Any]:
        """The camelCase dict as it appears in the custom resource."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


# --------------------------------------------------------------------------------------------- model


class Task(str, Enum):
    causal_lm = "causal-lm"
    sequence_classification = "sequence-classification"
    seq2seq_lm = "seq2seq-lm"


class JobReference(_Model):
    """A FineTuneJob in the same namespace (there is no namespace field on purpose: a job reads no other namespace's jobs)."""

    name: str = Field(max_length=253, pattern=K8S_NAME, description="Name of a FineTuneJob in this job's namespace.")


FROM_JOB_XOR_URI = "set exactly one of model.uri and model.fromJob"


class ModelSpec(_Model):
    """The base model to fine-tune."""

    uri: str | None = Field(
        default=None,
        description=(
            "Where the base model lives: an s3:// prefix holding a Hugging Face model folder "
            "(config.json, weights, tokenizer), hf://org/name for a hub id (needs network from the pods), "
            "or an absolute path on a volume mounted into the training pods. Exactly one of uri and fromJob."
        ),
        pattern=MODEL_URI,
        max_length=MAX_STR,
    )
    from_job: JobReference | None = Field(
        default=None,
        description=(
            "Continue from another FineTuneJob in this namespace: its exported model is the base (a full or merged "
            "model as is; an adapter is merged into its own base first, and this job trains a new adapter or all "
            "weights on top). The job waits Pending (reason WaitingForParentJob; ParentJobNotFound while no such job "
            "exists yet) until that job has Succeeded, and fails (ParentJobFailed) when it failed. status.lineage and the model "
            "card record the parent job, its model URI and its data report digest; the new model is also evaluated on "
            "the parent's test set (see evaluation.regression). The parent's files are read with this job's storage "
            "settings. Exactly one of uri and fromJob."
        ),
    )
    task: Task = Field(
        default=Task.causal_lm,
        description=(
            "What the model is trained to do: causal-lm (next-token prediction), sequence-classification, or "
            "seq2seq-lm (an encoder-decoder such as BART or T5: the prompt is the encoder's input, the loss is on the "
            "completion the decoder generates; dataset.format prompt-completion, hyperparameters.packing false)."
        ),
    )
    num_labels: int | None = Field(
        default=None,
        ge=2,
        le=10000,
        description="Number of classes for sequence-classification. Taken from len(labels) or from the data when unset.",
    )
    labels: list[str] | None = Field(
        default=None,
        min_length=2,
        max_length=10000,
        description=(
            "The class names for sequence-classification, in label-id order. Rows whose label is not listed "
            "fail the job with reason UnknownLabel. Derived from the training data when unset."
        ),
        json_schema_extra={"items": {"type": "string", "maxLength": 256}},
    )
    trust_remote_code: bool = Field(
        default=False, description="Allow model code shipped with the checkpoint to run. Off by default for safety."
    )

    @model_validator(mode="after")
    def _labels(self) -> "ModelSpec":
        if (self.uri is None) == (self.from_job is None):
            raise ValueError(FROM_JOB_XOR_URI)
        if self.task != Task.sequence_classification.value and (self.labels or self.num_labels):
            raise ValueError("model.labels and model.numLabels are only valid with task sequence-classification")
        if self.labels and self.num_labels and len(self.labels) != self.num_labels:
            raise ValueError("model.numLabels must equal the number of model.labels")
        if self.labels and len(set(self.labels)) != len(self.labels):
            raise ValueError("model.labels must be unique")
        return self

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel("has(self.uri) != has(self.fromJob)", FROM_JOB_XOR_URI),
                cel(
                    "self.task == 'sequence-classification' || (!has(self.labels) && !has(self.numLabels))",
                    "model.labels and model.numLabels are only valid with task sequence-classification",
                ),
                cel(
                    "!has(self.labels) || !has(self.numLabels) || size(self.labels) == self.numLabels",
                    "model.numLabels must equal the number of model.labels",
                ),
            ]
        }
    )


# -------------------------------------------------------------------------------------------- method


class Method(str, Enum):
    full = "full"
    lora = "lora"
    qlora = "qlora"
    dora = "dora"


ADAPTER_METHODS = (Method.lora.value, Method.qlora.value, Method.dora.value)


class LoraSpec(_Model):
    """Low-rank adapter settings (methods lora, qlora, dora)."""

    r: int = Field(default=16, ge=1, le=1024, description="Adapter rank.")
    alpha: int = Field(default=32, ge=1, le=4096, description="Adapter scaling numerator (scale = alpha / r).")
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0, description="Dropout on the adapter input.")
    target_modules: list[str] | None = Field(
        default=None,
        max_length=MAX_LIST,
        description=(
            "Module names to adapt (e.g. q_proj, v_proj). When unset the trainer picks the attention and MLP "
            "projections for the architecture; 'all-linear' adapts every linear layer."
        ),
        json_schema_extra={"items": {"type": "string", "maxLength": 128}},
    )


# ------------------------------------------------------------------------------------------- dataset


class DataFormat(str, Enum):
    text = "text"
    prompt_completion = "prompt-completion"
    chat = "chat"
    classification = "classification"
    preference = "preference"


class LeakagePolicy(str, Enum):
    fail = "fail"
    warn = "warn"
    drop = "drop"
    off = "off"


class Normalization(str, Enum):
    safe = "safe"
    aggressive = "aggressive"
    none = "none"


NORMALIZE_DESCRIPTION = (
    "How the training text is normalised. safe (default): Unicode NFC, line endings unified, zero-width "
    "space/word joiner/BOM/soft hyphen and control characters (except tab and newline) removed, trailing "
    "spaces cut at line ends; indentation, tabs, runs of spaces, full-width punctuation and compatibility "
    "characters such as x² or ½ are kept. aggressive: Unicode NFKC (x² becomes x2, ½ becomes 1⁄2, full-width "
    "letters and punctuation become ASCII), every run of spaces/tabs collapsed to one space (code loses its "
    "indentation), at most one blank line, ends stripped; the model then learns text users never send, so "
    "use it only for noisy text. none: the text as read. true and false are read as safe and none in "
    "configs given to the trainer directly. Duplicate and leakage checks always compare the aggressive, "
    "casefolded form, whatever is chosen here."
)


class MatchKey(str, Enum):
    turns = "turns"
    row = "row"
    prompt = "prompt"
    completion = "completion"
    user_turns = "userTurns"


MATCH_KEY_DESCRIPTION = (
    "The part of each row that {what} compare. turns (default): the whole row except chat system messages, so "
    "rows that share a long system prompt but differ in their turns are not taken for copies; row: everything, "
    "system messages included; prompt: the prompt (chat: every message before the last assistant turn); "
    "completion: the completion (chat: the assistant turns); userTurns: the user messages (prompt-completion: the "
    "prompt). Formats text and classification have one text, so every choice compares it. A shared template "
    "inside a prompt-completion prompt is still compared: choose completion when the prompts are templated."
)


PREFERENCE_KEYS_DESCRIPTION = (
    " Format preference: dedupe compares prompt, chosen and rejected (row, turns; turns leaves out system messages), "
    "the prompt (prompt, userTurns) or both responses (completion); the leakage checks always compare the prompt "
    "(userTurns: its user messages), since a test prompt whose pair was trained on is leaked whatever its responses."
)


class LabelConflictPolicy(str, Enum):
    drop = "drop"
    keep_first = "keepFirst"
    fail = "fail"


class FieldNames(_Model):
    """Column names in the data files."""

    text: str = Field(default="text", max_length=128, description="Column with the text (formats text, classification).")
    prompt: str = Field(
        default="prompt",
        max_length=128,
        description=(
            "Column with the prompt (formats prompt-completion and preference; for preference it may also be a list of "
            "{role, content} messages, rendered with the tokenizer's chat template)."
        ),
    )
    completion: str = Field(
        default="completion", max_length=128, description="Column with the completion (format prompt-completion)."
    )
    messages: str = Field(
        default="messages",
        max_length=128,
        description="Column with the list of {role, content} messages (format chat).",
    )
    label: str = Field(default="label", max_length=128, description="Column with the class label (format classification).")
    chosen: str = Field(
        default="chosen",
        max_length=128,
        description="Column with the preferred response (format preference): text, or a list of assistant {role, content} messages.",
    )
    rejected: str = Field(
        default="rejected",
        max_length=128,
        description="Column with the dispreferred response to the same prompt (format preference), in the form of chosen.",
    )


class SplitSpec(_Model):
    """How validation and test sets are carved from train when not given as files."""

    validation: float = Field(default=0.1, ge=0.0, lt=1.0, description="Fraction of train held out for validation.")
    test: float = Field(default=0.1, ge=0.0, lt=1.0, description="Fraction of train held out for the final test.")
    seed: int = Field(default=42, ge=0, description="Seed of the split; the same seed gives the same split.")
    stratify: bool = Field(default=True, description="Keep class proportions in every split (classification only).")

    @model_validator(mode="after")
    def _sum(self) -> "SplitSpec":
        if self.validation + self.test >= 1.0:
            raise ValueError("dataset.split.validation + dataset.split.test must be below 1")
        return self

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel("self.validation + self.test < 1.0", "dataset.split.validation + dataset.split.test must be below 1")
            ]
        }
    )


class DedupeSpec(_Model):
    """Duplicate removal."""

    exact: bool = Field(default=True, description="Drop rows whose normalised text equals an earlier row's.")
    near: bool = Field(default=True, description="Drop near-duplicates found with MinHash LSH.")
    near_threshold: float = Field(
        default=0.85,
        gt=0.0,
        le=1.0,
        description="Estimated Jaccard similarity of word 5-gram shingles at or above which two rows are near-duplicates.",
    )
    key: MatchKey = Field(
        default=MatchKey.turns, description=MATCH_KEY_DESCRIPTION.format(what="exact and near dedupe") + PREFERENCE_KEYS_DESCRIPTION
    )


PII_REGIONS_DEFAULT = ("US", "GB", "FR", "DE")


class PreprocessingSpec(_Model):
    """Data cleaning applied to every split before tokenisation; each step is counted in the data report."""

    normalize: Normalization = Field(default=Normalization.safe, description=NORMALIZE_DESCRIPTION)
    lowercase: bool = Field(default=False, description="Lowercase all text.")
    drop_empty: bool = Field(default=True, description="Drop rows whose text is empty after cleanup.")
    min_tokens: int = Field(default=1, ge=0, description="Drop rows with fewer tokens than this.")
    max_tokens: int | None = Field(
        default=None, ge=1, description="Drop rows with more tokens than this (default: keep, truncate to maxSeqLength)."
    )
    dedupe: DedupeSpec = Field(default_factory=DedupeSpec, description="Exact and near-duplicate removal.")
    redact_pii: bool = Field(
        default=True,
        description=(
            "Replace personal data and credentials with typed placeholders: emails, phone numbers, payment card numbers "
            "(Luhn), IBANs (mod 97), IP addresses, US SSNs, national identity numbers and cloud keys/API tokens/private "
            "keys. Person names and postal addresses are not detected. The data report (pii_coverage) and the model "
            "card list what was and was not looked for."
        ),
    )
    pii_regions: list[str] = Field(
        default_factory=lambda: list(PII_REGIONS_DEFAULT),
        min_length=1,
        max_length=MAX_LIST,
        description=(
            "ISO 3166 country codes whose national phone-number formats (libphonenumber) and identity numbers "
            "(US SSN, GB NINO/NHS, FR NIR, DE tax id, ES DNI/NIE, IT codice fiscale, NL BSN, each checksum-validated) "
            "redactPii looks for. Numbers in +international format are found whatever the list."
        ),
        json_schema_extra={"items": {"type": "string", "pattern": "^[A-Za-z]{2}$"}},
    )
    max_malformed_fraction: float = Field(
        default=0.05,
        ge=0.0,
        le=1.0,
        description="Fail with reason MalformedData when more than this fraction of rows cannot be parsed.",
    )
    class_weights: bool = Field(
        default=False, description="Weight the classification loss by inverse class frequency (imbalanced data)."
    )
    label_conflicts: LabelConflictPolicy = Field(
        default=LabelConflictPolicy.drop,
        description=(
            "Classification: rows with the same text (compared like exact duplicates) but different labels are a "
            "data error, not duplicates. drop (default): every row of such a text is removed; keepFirst: the first "
            "row's label wins and the others are removed; fail: the job fails with reason MalformedData. Counted, "
            "with examples, as label_conflicts in the data report."
        ),
    )

    @field_validator("pii_regions")
    @classmethod
    def _pii_regions(cls, value: list[str]) -> list[str]:
        out: list[str] = []
        for code in value:
            if not (len(code) == 2 and code.isascii() and code.isalpha()):
                raise ValueError(f"piiRegions: {code!r} is not a two-letter ISO 3166 country code")
            if code.upper() not in out:
                out.append(code.upper())
        return out

    @field_validator("normalize", mode="before")
    @classmethod
    def _normalize_bool(cls, value: object) -> object:
        """``normalize: true/false`` (the field's old boolean form) means safe / none."""
        if isinstance(value, bool):
            return Normalization.safe.value if value else Normalization.none.value
        return value


# A size in bytes with a binary suffix, at least 1Ki ("16Mi", "32Gi"): a Kubernetes quantity that
# quantity_bytes() reads without a Kubernetes client (the trainer has none).
BYTES_QUANTITY = r"^[1-9][0-9]*(Ki|Mi|Gi|Ti)$"
_BINARY_SUFFIXES = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def quantity_bytes(quantity: str) -> int:
    """The bytes in a :data:`BYTES_QUANTITY` quantity (``"16Mi"`` -> 16777216)."""
    return int(quantity[:-2]) * _BINARY_SUFFIXES[quantity[-2:]]


def bytes_quantity(n: int) -> str:
    """``n`` bytes as a Kubernetes quantity, in the largest binary suffix that divides it exactly."""
    for suffix, size in reversed(_BINARY_SUFFIXES.items()):
        if n and n % size == 0:
            return f"{n // size}{suffix}"
    return str(n)


class DataLimits(_Model):
    """Caps on what one data file may make the trainer read and hold, so a hostile or broken file (a gzip
    or Parquet dictionary bomb, a file with no line breaks, text that Unicode normalisation blows up) fails
    the job with reason MalformedData, naming the file and the cap, instead of the pod being OOM-killed."""

    max_file_bytes: str = Field(
        default="32Gi",
        max_length=32,
        pattern=BYTES_QUANTITY,
        description=(
            "Most bytes one data file may hold after decompression (a .gz file's text, a Parquet file's decoded "
            "values), e.g. 32Gi. Files are streamed, so this bounds time and not memory; a file past it fails the "
            "job with reason MalformedData (split the file or raise the cap)."
        ),
    )
    max_record_bytes: str = Field(
        default="16Mi",
        max_length=32,
        pattern=BYTES_QUANTITY,
        description=(
            "Most bytes one row may take: a JSON Lines line, a CSV record (all its lines), an element of a JSON "
            "array, a Parquet row's decoded values. This is what the trainer holds of a file at once; a longer row "
            "fails the job with reason MalformedData (the cause is usually a file without line breaks or the wrong "
            "format). Rows far longer than hyperparameters.maxSeqLength tokens are truncated anyway."
        ),
    )
    max_normalization_expansion: float = Field(
        default=4.0,
        ge=1.0,
        le=100.0,
        description=(
            "Most times longer a row's text may become under Unicode NFKC, which the duplicate and leakage checks "
            "(and normalize: aggressive) apply: one character can expand up to 18-fold (U+FDFA). A row past it is "
            "counted as malformed (see maxMalformedFraction), not normalised. Real text stays near 1."
        ),
    )

    @property
    def file_bytes(self) -> int:
        return quantity_bytes(self.max_file_bytes)

    @property
    def record_bytes(self) -> int:
        return quantity_bytes(self.max_record_bytes)


_CV_NOT_WITH_VALIDATION = (
    "dataset.crossValidation makes its own validation folds from the training rows; remove dataset.validation "
    "(or remove crossValidation to validate on that file)"
)
_CV_RESUME = "dataset.crossValidation resumes at its own fold and step: checkpoint.resume must be latest or none"


class CrossValidationSpec(_Model):
    """K-fold cross-validation inside one job (sequential folds, then one refit on all non-test rows)."""

    folds: int = Field(
        ge=2, le=20,
        description=(
            "K: the training rows (everything but the test split) are cut into K folds with scikit-learn's (Stratified)KFold, "
            "seeded by dataset.split.seed; K trainings from the same base model with the same hyperparameters each validate on "
            "one fold. dataset.split.validation is not used."
        ),
    )
    stratify: bool = Field(
        default=True,
        description="Keep the class proportions in every fold (StratifiedKFold; classification only, other tasks use plain KFold).",
    )


class DatasetSpec(_Model):
    """Where the data is and how to prepare it."""

    train: str = Field(
        description="Training data: an s3:// object or prefix, or an absolute path. JSONL, CSV or Parquet; a prefix means all such files under it.",
        pattern=DATA_URI,
        max_length=MAX_STR,
    )
    validation: str | None = Field(
        default=None,
        description="Validation data (same forms as train). When unset it is split from train by split.validation.",
        pattern=DATA_URI,
        max_length=MAX_STR,
    )
    test: str | None = Field(
        default=None,
        description="Test data, evaluated once with the best model. When unset it is split from train by split.test.",
        pattern=DATA_URI,
        max_length=MAX_STR,
    )
    format: DataFormat = Field(
        default=DataFormat.text,
        description=(
            "Row format: text, prompt-completion (loss on completion only), chat (loss on assistant turns only), classification, "
            "or preference (prompt, chosen, rejected; objective dpo or simpo, scored on the response tokens only)."
        ),
    )
    fields: FieldNames = Field(default_factory=FieldNames, description="Column names in the data files.")
    split: SplitSpec = Field(default_factory=SplitSpec, description="Split ratios and seed, used when validation/test are not given.")
    preprocessing: PreprocessingSpec = Field(default_factory=PreprocessingSpec, description="Cleaning steps.")
    limits: DataLimits = Field(
        default_factory=DataLimits, description="Caps on file, row and normalised-text size that bound the trainer's memory and time on any input."
    )
    leakage_check: LeakagePolicy = Field(
        default=LeakagePolicy.fail,
        description=(
            "What to do when a validation/test example also appears (exactly or nearly) in train: fail the job, "
            "warn, drop it from validation/test, or off. The same policy applies to test examples found in "
            "validation (they were seen when the checkpoint was chosen) and to retention examples found in train "
            "(the forgetting check would measure trained data)."
        ),
    )
    leakage_key: MatchKey = Field(
        default=MatchKey.turns,
        description=MATCH_KEY_DESCRIPTION.format(what="the leakage checks") + PREFERENCE_KEYS_DESCRIPTION,
    )
    cross_validation: CrossValidationSpec | None = Field(
        default=None,
        description=(
            "K-fold cross-validation: the folds run one after another in this job (each a fresh model and optimizer; a resume "
            "continues at the same fold and step), each fold's validation rows are leakage-checked against its training folds "
            "(dataset.leakageCheck), and status.crossValidation gives every fold's metrics and their mean and standard "
            "deviation. The exported model is then trained once more on all non-test rows (the refit; no validation, so no "
            "early stopping or best-checkpoint choice there) and tested on the test split as usual."
        ),
    )

    @model_validator(mode="after")
    def _cross_validation(self) -> "DatasetSpec":
        if self.cross_validation is not None and self.validation:
            raise ValueError(_CV_NOT_WITH_VALIDATION)
        return self

    model_config = ConfigDict(
        json_schema_extra={"x-kubernetes-validations": [cel("!has(self.crossValidation) || !has(self.validation)", _CV_NOT_WITH_VALIDATION)]}
    )


# ----------------------------------------------------------------------------------- hyperparameters


class Precision(str, Enum):
    auto = "auto"
    bf16 = "bf16"
    fp16 = "fp16"
    fp32 = "fp32"


class LRScheduler(str, Enum):
    linear = "linear"
    cosine = "cosine"
    constant = "constant"
    constant_with_warmup = "constant_with_warmup"
    polynomial = "polynomial"


class DistributedStrategy(str, Enum):
    auto = "auto"
    ddp = "ddp"
    fsdp = "fsdp"


FSDP_AUTO_MIN_PARAMS = 1_000_000_000  # auto shards full fine-tunes of models at least this large


class Hyperparameters(_Model):
    """Optimisation settings. Defaults suit a LoRA fine-tune of a 1-8B model."""

    epochs: float | None = Field(default=None, gt=0, le=1000, description="Passes over the training data. Default 3 when maxSteps is unset.")
    max_steps: int | None = Field(default=None, ge=1, description="Optimizer steps to run; overrides epochs.")
    learning_rate: float = Field(default=2e-4, gt=0, le=1.0, description="Peak learning rate.")
    lr_scheduler: LRScheduler = Field(default=LRScheduler.cosine, description="Learning-rate schedule after warmup.")
    warmup_ratio: float = Field(default=0.03, ge=0.0, lt=1.0, description="Fraction of steps spent warming up.")
    batch_size: int = Field(default=8, ge=1, le=4096, description="Micro-batch size per device.")
    gradient_accumulation_steps: int = Field(default=1, ge=1, le=1024, description="Micro-batches per optimizer step.")
    weight_decay: float = Field(default=0.0, ge=0.0, lt=1.0, description="AdamW weight decay.")
    dropout: float | None = Field(default=None, ge=0.0, lt=1.0, description="Override the model's dropout probabilities.")
    max_grad_norm: float = Field(default=1.0, gt=0, description="Gradient clipping norm.")
    max_seq_length: int = Field(default=1024, ge=8, le=262144, description="Tokens per sequence; longer rows are truncated.")
    packing: bool | None = Field(
        default=None,
        description=(
            "Causal LM: pack several rows into one sequence (padding-free) so no compute goes to pad tokens. Attention is kept "
            "inside each row (flash-attention's varlen kernel when installed, else SDPA per row, memory linear in tokens); at "
            "start-up the trainer checks on two rows that packed and unpacked logits agree and fails with InvalidConfig if the "
            "model attends across rows. Unset: true for a causal LM trained with the next-token loss, false for model.task "
            "seq2seq-lm (encoder-decoder rows are padded) and objective.type dpo/simpo (pairs are scored as padded rows), "
            "where true is refused; the job config the trainer gets says which was used."
        ),
    )
    gradient_checkpointing: bool = Field(default=False, description="Trade compute for memory by recomputing activations.")
    precision: Precision = Field(default=Precision.auto, description="auto picks bf16 where the GPU supports it, else fp16 on GPU, fp32 on CPU.")
    seed: int = Field(default=42, ge=0, description="Seed for initialisation, shuffling and dropout.")
    distributed_strategy: DistributedStrategy = Field(
        default=DistributedStrategy.auto,
        description=(
            "How several processes share the work. ddp: every process holds the whole model and optimizer "
            "(data parallel). fsdp: parameters, gradients and optimizer state are sharded across processes "
            "(FSDP2), so a full fine-tune fits in a fraction of the per-GPU memory; method full only. auto: "
            "fsdp for full fine-tunes of models with at least 1B parameters run on more than one process, "
            "ddp otherwise."
        ),
    )

    @model_validator(mode="after")
    def _length(self) -> "Hyperparameters":
        if self.epochs is not None and self.max_steps is not None:
            raise ValueError("set hyperparameters.epochs or hyperparameters.maxSteps, not both")
        return self

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel("!(has(self.epochs) && has(self.maxSteps))", "set hyperparameters.epochs or hyperparameters.maxSteps, not both")
            ]
        }
    )

    @property
    def total_epochs(self) -> float:
        return self.epochs if self.epochs is not None else 3.0


# ---------------------------------------------------------------------------------------- evaluation


class Strategy(str, Enum):
    steps = "steps"
    epoch = "epoch"


class Mode(str, Enum):
    min = "min"
    max = "max"


def _mode_cel(direction: metric_catalogue.Direction) -> dict[str, Any]:
    names = ", ".join(f"'{m}'" for m in metric_catalogue.judged(direction))
    return cel(f"!has(self.mode) || !(self.metric in [{names}]) || self.mode == '{direction}'", metric_catalogue.mode_rule(direction))


class EarlyStopping(_Model):
    """Stop when the monitored metric stops improving.

    ``mode`` follows the metric (:mod:`finetune_api.metric_catalogue`) when unset: ``max`` for accuracy and
    F1, ``min`` for losses. A mode that contradicts a known metric is rejected, because it would stop on
    the wrong trend and, with useBestModel, export the worst checkpoint.
    """

    metric: str = Field(default="eval_loss", max_length=128, description="Metric to monitor, e.g. eval_loss, accuracy, f1_macro.")
    mode: Mode | None = Field(
        default=None,
        description=(
            "min when lower is better, max when higher is better. Default: the metric's own direction "
            f"(max for {', '.join(metric_catalogue.judged('max'))}; min for {', '.join(metric_catalogue.judged('min'))} "
            "and any other metric). Must agree with it for the metrics named here."
        ),
    )
    patience: int = Field(default=3, ge=1, le=1000, description="Evaluations without improvement before stopping.")
    min_delta: float = Field(default=0.0, ge=0.0, description="Smallest change that counts as an improvement.")

    @model_validator(mode="before")
    @classmethod
    def _default_mode(cls, data: Any) -> Any:
        """Fill an absent mode from the metric, so the stored config says which way is better."""
        if isinstance(data, dict) and data.get("mode") is None:
            metric = data.get("metric", "eval_loss")
            known = metric_catalogue.direction(metric) if isinstance(metric, str) else None
            data = {**data, "mode": known or Mode.min.value}
        return data

    @model_validator(mode="after")
    def _mode_agrees(self) -> "EarlyStopping":
        expected = metric_catalogue.direction(self.metric)
        if expected is not None and self.direction != expected:
            raise ValueError(metric_catalogue.mode_rule(expected))
        return self

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [_mode_cel("min"), _mode_cel("max")]})

    @property
    def direction(self) -> metric_catalogue.Direction:
        """``min`` or ``max``: the mode, always set after validation."""
        return "max" if self.mode == Mode.max.value else "min"


class RetentionSpec(_Model):
    """Catastrophic-forgetting check: loss on general data before and after fine-tuning."""

    dataset: str = Field(description="Retention data (same forms as dataset.train), in the job's dataset format.", pattern=DATA_URI, max_length=MAX_STR)
    max_loss_increase: float = Field(
        default=0.1, ge=0.0, le=100.0, description="Largest allowed relative loss increase (0.1 = 10%)."
    )
    action: Literal["warn", "fail"] = Field(default="warn", description="What happens past the threshold.")


class GenerationSpec(_Model):
    """How the completions scored by bleu and rouge are generated (greedy or beam search, no sampling)."""

    max_new_tokens: int = Field(
        default=128,
        ge=1,
        le=4096,
        description="Most tokens generated per completion (never more than hyperparameters.maxSeqLength).",
    )
    num_beams: int = Field(default=1, ge=1, le=16, description="Beam-search width; 1 is greedy decoding.")


class RegressionSpec(_Model):
    """The regression gate of a job with model.fromJob: the new model against its parent, on the parent's test set."""

    max_drop: float = Field(
        default=0.0,
        ge=0.0,
        le=1e6,
        description=(
            "Largest allowed worsening of metric, in the metric's own units (0.02 = two accuracy points; for a loss, "
            "a rise of 0.02), from the parent's recorded test value to the new model's value on the same test rows."
        ),
    )
    metric: str | None = Field(
        default=None,
        max_length=128,
        description=(
            "Metric compared, e.g. accuracy, f1_macro, eval_loss; which way is better comes from the metric "
            "(higher for accuracy and F1, lower for losses). Default: the job's headline metric, the one its gain "
            "is reported on (earlyStopping.metric, and accuracy for a classifier that monitors eval_loss)."
        ),
    )
    action: Literal["warn", "fail"] = Field(
        default="warn",
        description=(
            "What happens past maxDrop. warn: the job succeeds, with a Warning Event (RegressionDetected) and "
            "status.lineage.regression.passed false; fail: the job fails with reason RegressionDetected and no "
            "model is exported (nothing under output.uri/model)."
        ),
    )

    @field_validator("metric")
    @classmethod
    def _judged(cls, value: str | None) -> str | None:
        if value is not None and metric_catalogue.direction(value) is None:
            raise ValueError(f"evaluation.regression.metric {value!r} is not a judged metric; use one of {', '.join(metric_catalogue.judged('max') + metric_catalogue.judged('min'))}")
        return value


class EvaluationSpec(_Model):
    """Validation during training and the final test."""

    strategy: Strategy = Field(default=Strategy.steps, description="Evaluate every everySteps optimizer steps, or once per epoch.")
    every_steps: int = Field(default=100, ge=1, description="Steps between evaluations when strategy is steps.")
    metrics: list[str] | None = Field(
        default=None,
        max_length=MAX_LIST,
        description=(
            "Extra metrics. Always computed: loss, perplexity and token accuracy (LM) or accuracy, "
            "precision/recall/F1 (classification). Optional, LM with prompt-completion or chat data: bleu and "
            "rouge (ROUGE-L F1, reported as rouge_l; with task seq2seq-lm also ROUGE-1 and ROUGE-2 F1, rouge_1 and rouge_2) "
            "of completions (evaluation.generation) of the prompts' own token ids (chat template included), at every evaluation on a seeded sample of up to 32 validation prompts and once on "
            "up to maxEvalSamples (default 64) test prompts; the sample is stratified by completion when the "
            "completions are a few labels. earlyStopping.metric may then be bleu or rouge_l (and rouge_1, rouge_2)."
        ),
        json_schema_extra={"items": {"type": "string", "enum": ["bleu", "rouge", "token_accuracy"]}},
    )
    generation: GenerationSpec = Field(
        default_factory=GenerationSpec,
        description="Length and beam width of the completions that bleu and rouge score (the fine-tuned model and every baseline alike).",
    )
    early_stopping: EarlyStopping | None = Field(default=None, description="Stop on a plateau and keep the best checkpoint.")
    calibration: bool = Field(default=True, description="Classification: fit temperature scaling on validation; report ECE and NLL before and after on validation and on test.")
    baseline: bool = Field(
        default=True,
        description=(
            "Measure the baselines before training, on the test set (validation without one), so the report shows "
            "the gain test vs test: the base model (LM) or encoder + untrained head (random_head), plus the "
            "majority class and a linear probe on frozen features (classification) or k-shot prompting (causal LM)."
        ),
    )
    few_shot_examples: int = Field(
        default=4,
        ge=0,
        le=32,
        description=(
            "Causal LM with bleu/rouge in metrics: training examples (drawn with hyperparameters.seed) shown to the "
            "base model before each prompt for the k_shot baseline; 0 disables it."
        ),
    )
    retention: RetentionSpec | None = Field(default=None, description="Catastrophic-forgetting check.")
    regression: RegressionSpec | None = Field(
        default=None,
        description=(
            "With model.fromJob: how much worse than its parent, on the parent's test set, the new model may be "
            "(default when unset: maxDrop 0, action warn; the comparison is always made and reported)."
        ),
    )
    max_eval_samples: int | None = Field(default=None, ge=1, description="Cap on validation rows per evaluation.")
    use_best_model: bool = Field(
        default=True,
        description=(
            "Test and export the weights of the best evaluation (by earlyStopping.metric, else eval_loss) "
            "instead of the last step's; the best checkpoint is kept besides the last keepLast ones. Needs validation data."
        ),
    )


# -------------------------------------------------------------------------------------- distillation

DISTILLATION_TASKS = (Task.causal_lm.value, Task.sequence_classification.value)
_DISTILLATION_TASK_RULE = "distillation needs model.task causal-lm or sequence-classification (it matches the two models' logits)"


TEACHER_XOR = "set exactly one of distillation.teacher.uri and distillation.teacher.fromJob"


class TeacherSpec(_Model):
    """The model whose softened outputs the student learns from: a URI, or a FineTuneJob that exported it."""

    uri: str | None = Field(
        default=None,
        description=(
            "Where the teacher lives, in the same forms as model.uri (an s3:// prefix holding a Hugging Face model folder, "
            "hf://org/name, or an absolute path), e.g. the model/ folder a full fine-tune or a merged adapter "
            "(output.mergeAdapter, model/merged) of an earlier FineTuneJob wrote. It must be a model of the job's task with "
            "the student's tokenizer (same vocabulary: it reads the student's token ids) and, for sequence-classification, "
            "a trained head with the student's labels in the same order; the trainer fails with InvalidConfig otherwise. "
            "Exactly one of uri and fromJob."
        ),
        pattern=MODEL_URI,
        max_length=MAX_STR,
    )
    from_job: JobReference | None = Field(
        default=None,
        description=(
            "The teacher is the model another FineTuneJob in this namespace exported: the job waits Pending (reason "
            "WaitingForParentJob, or ParentJobNotFound while it does not exist) until that job has Succeeded, fails "
            "(ParentJobFailed) when it failed, trained another task or exported only an adapter (set output.mergeAdapter on it), and records "
            "the resolved model in status.teacherUri. Exactly one of uri and fromJob."
        ),
    )
    precision: Precision = Field(
        default=Precision.auto,
        description=(
            "The dtype the teacher's weights are held and run in (inference only, no gradients): auto picks bf16 where "
            "the GPU supports it, else fp16 on GPU, fp32 on CPU; fp16 needs a GPU. Every training process holds a whole "
            "copy of the teacher (it is not sharded under fsdp), so size resources for both models."
        ),
    )

    @model_validator(mode="after")
    def _one_source(self) -> "TeacherSpec":
        if (self.uri is None) == (self.from_job is None):
            raise ValueError(TEACHER_XOR)
        return self

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [cel("has(self.uri) != has(self.fromJob)", TEACHER_XOR)]})


class DistillationSpec(_Model):
    """Knowledge distillation: the student (model.uri) also learns the teacher's temperature-softened outputs.

    Loss per loss unit (a completion token for causal-lm, a row for sequence-classification) is
    ``(1 - alpha) * task loss + alpha * temperature^2 * KL(p_teacher || p_student)`` with
    ``p = softmax(logits / temperature)``: Hinton et al.'s distillation term, the student's softened
    distribution measured against the teacher's.
    """

    teacher: TeacherSpec = Field(description="The teacher model.")
    temperature: float = Field(
        default=2.0,
        gt=0.0,
        le=100.0,
        description=(
            "Softens both models' logits (divided by it) before they are compared; above 1 the student also learns how "
            "the teacher ranks the wrong answers. The KL term is multiplied by temperature^2 so its gradients keep "
            "their size as the temperature changes."
        ),
    )
    alpha: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description=(
            "Weight of the distillation (KL) term; the task loss (cross-entropy on the labels) gets 1 - alpha. 0 trains "
            "on the labels alone (the teacher is still evaluated for the report), 1 on the teacher alone."
        ),
    )


# ----------------------------------------------------------------------------------------- objective


class ObjectiveType(str, Enum):
    sft = "sft"
    dpo = "dpo"
    simpo = "simpo"


PREFERENCE_OBJECTIVES = (ObjectiveType.dpo.value, ObjectiveType.simpo.value)
OBJECTIVE_DEFAULTS = {"dpo": {"beta": 0.1}, "simpo": {"beta": 2.0, "gamma": 1.0}}
"""beta (and SimPO's gamma) when unset: the values of the DPO and SimPO papers' main experiments."""


class ObjectiveSpec(_Model):
    """What the model is trained to do with each row. A top-level setting (not a hyperparameter) because it decides
    the data format (dpo and simpo read preference pairs), the loss and the metrics, like model.task does."""

    type: ObjectiveType = Field(
        default=ObjectiveType.sft,
        description=(
            "sft: next-token loss on the completions (every format but preference). dpo: Direct Preference Optimization "
            "(Rafailov et al. 2023), -log sigmoid(beta * ((log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log "
            "ref(rejected)))), the reference being the base model (the adapter switched off for adapter methods; for "
            "method full the base weights before the first step), its log-probabilities computed once before training. "
            "simpo: SimPO (Meng et al. 2024), reference-free, -log sigmoid(beta / |chosen| * log pi(chosen) - beta / "
            "|rejected| * log pi(rejected) - gamma) with |y| the response's token count. dpo and simpo need dataset.format "
            "preference and hyperparameters.packing false."
        ),
    )
    beta: float | None = Field(
        default=None,
        gt=0.0,
        le=100.0,
        description="dpo: strength of the pull towards the reference (default 0.1); simpo: reward scale (default 2.0). Not with sft.",
    )
    gamma: float | None = Field(
        default=None, ge=0.0, le=100.0, description="simpo only: target reward margin (default 1.0)."
    )

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        """Fill beta/gamma from the type, so the stored config says which values were used."""
        if isinstance(data, dict):
            kind = data.get("type", ObjectiveType.sft.value)
            kind = getattr(kind, "value", kind)
            defaults = OBJECTIVE_DEFAULTS.get(kind, {}) if isinstance(kind, str) else {}
            data = {**data, **{name: value for name, value in defaults.items() if data.get(name) is None}}
        return data

    @model_validator(mode="after")
    def _fields(self) -> "ObjectiveSpec":
        if self.type == ObjectiveType.sft.value and self.beta is not None:
            raise ValueError(_BETA_NEEDS_PREFERENCE)
        if self.type != ObjectiveType.simpo.value and self.gamma is not None:
            raise ValueError(_GAMMA_SIMPO_ONLY)
        return self

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel("self.type != 'sft' || !has(self.beta)", "objective.beta is only valid with objective.type dpo or simpo"),
                cel("self.type == 'simpo' || !has(self.gamma)", "objective.gamma is only valid with objective.type simpo"),
            ]
        }
    )


_BETA_NEEDS_PREFERENCE = "objective.beta is only valid with objective.type dpo or simpo"
_GAMMA_SIMPO_ONLY = "objective.gamma is only valid with objective.type simpo"
_PREFERENCE_FORMAT = "dataset.format preference goes with objective.type dpo or simpo, and only with it"
_PREFERENCE_PACKING = (
    "objective.type dpo and simpo need hyperparameters.packing false (the chosen and rejected responses of a pair are "
    "scored as separate padded rows)"
)
_PREFERENCE_RETENTION = "evaluation.retention is not supported with objective.type dpo or simpo; remove it"
_PREFERENCE_DISTILLATION = "distillation is not supported with objective.type dpo or simpo (the KD term mixes into the next-token loss); remove it"
_PREFERENCE_GENERATION = "evaluation.metrics bleu and rouge are not computed with objective.type dpo or simpo; remove them"
_PREFERENCE = "has(self.objective) && has(self.objective.type) && self.objective.type != 'sft'"


# ---------------------------------------------------------------------------------------- checkpoint


class CheckpointSpec(_Model):
    """Checkpoints are written to <output>/checkpoints/step-NNNNNNNN/ with a manifest written last."""

    every_steps: int = Field(default=500, ge=1, description="Optimizer steps between checkpoints (one is always written at the end).")
    keep_last: int = Field(default=3, ge=1, le=1000, description="Complete checkpoints to keep, plus the best one.")
    resume: str = Field(
        default="latest",
        max_length=MAX_STR,
        pattern=r"^(latest|none|s3://.+|/.+)$",
        description="latest: continue from the newest complete checkpoint under output; none: start fresh; or the URI of one checkpoint.",
    )


class OutputSpec(_Model):
    """Where results go."""

    uri: str = Field(
        description="s3:// prefix (or absolute path) for checkpoints, the final model, progress.json and data-report.json.",
        pattern=OUTPUT_URI,
        max_length=MAX_STR,
    )
    merge_adapter: bool = Field(default=False, description="Also write the base model with the adapter merged in (adapter methods).")


# ----------------------------------------------------------------------------------------- resources


class EnvVar(_Model):
    """An extra environment variable for the trainer (literal values only; use storage.credentialsSecret for secrets)."""

    name: str = Field(max_length=256, pattern=r"^[A-Za-z_][A-Za-z0-9_.\-]*$", description="Variable name.")
    value: str = Field(default="", max_length=32768, description="Variable value.")


class LocalObjectReference(_Model):
    name: str = Field(max_length=253, pattern=K8S_NAME, description="Name of the object in the job's namespace.")


_FREEFORM: JsonDict = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}


class ResourcesSpec(_Model):
    """Shape and placement of the training pods."""

    nodes: int = Field(default=1, ge=1, le=MAX_NODES, description="Pods (torchrun nodes) in the training group.")
    gpus_per_node: int = Field(default=1, ge=0, le=16, description="nvidia.com/gpu per pod; also torchrun's nproc-per-node (1 process when 0).")
    image: str | None = Field(default=None, max_length=MAX_STR, description="Trainer image; the operator's configured default when unset.")
    cpu: str | None = Field(default=None, max_length=64, pattern=r"^[0-9]+(\.[0-9]+)?m?$", description="CPU request and limit per pod, e.g. 8 or 500m.")
    memory: str | None = Field(
        default=None, max_length=64, pattern=r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|K|M|G|T)?$", description="Memory request and limit per pod, e.g. 64Gi."
    )
    node_selector: dict[str, str] | None = Field(
        default=None, description="Node labels the pods must match.", json_schema_extra={"maxProperties": 64}
    )
    tolerations: list[dict[str, Any]] | None = Field(
        default=None,
        max_length=MAX_LIST,
        description="Pod tolerations (core/v1 Toleration).",
        json_schema_extra={"items": _FREEFORM},
    )
    affinity: dict[str, Any] | None = Field(default=None, description="Pod affinity (core/v1 Affinity).", json_schema_extra=_FREEFORM)
    priority_class_name: str | None = Field(default=None, max_length=253, pattern=DNS_SUBDOMAIN, description="PriorityClass of the pods.")
    queue_name: str | None = Field(
        default=None,
        max_length=LABEL_VALUE_MAX,  # it becomes the value of the kueue.x-k8s.io/queue-name label
        pattern=K8S_NAME,
        description="Kueue LocalQueue. The Job is created suspended with kueue.x-k8s.io/queue-name so Kueue admits the group as a gang.",
    )
    env: list[EnvVar] | None = Field(default=None, max_length=MAX_LIST, description="Extra environment variables for the trainer.")
    image_pull_secrets: list[LocalObjectReference] | None = Field(default=None, max_length=16, description="Secrets for pulling the image.")
    shm_size: str = Field(
        default="8Gi", max_length=64, pattern=r"^[0-9]+(Ki|Mi|Gi)?$", description="Size of the in-memory /dev/shm volume (NCCL and data loaders need it)."
    )
    cache_size: str = Field(
        default="40Gi",
        max_length=32,
        pattern=BYTES_QUANTITY,
        description=(
            "Disk for the /cache emptyDir of each pod (its sizeLimit): the downloaded base model and the Hugging Face "
            "cache. Raise it for models over about 8B parameters. Part of the pod's ephemeral-storage request and limit "
            "(cacheSize + scratchSize + 1Gi for logs); a pod that writes more is evicted by the kubelet."
        ),
    )
    scratch_size: str = Field(
        default="20Gi",
        max_length=32,
        pattern=BYTES_QUANTITY,
        description=(
            "Disk for the /tmp emptyDir of each pod (its sizeLimit): the work folder with the dataset file being "
            "read, the tokenised datasets, checkpoints before upload and the exported model. Raise it for full "
            "fine-tunes (a checkpoint holds the weights and optimizer state). Part of the pod's ephemeral-storage "
            "request and limit, like cacheSize."
        ),
    )


class StorageSpec(_Model):
    """S3-compatible object store access."""

    endpoint: str | None = Field(
        default=None,
        max_length=MAX_STR,
        pattern=r"^https?://[^\s]+$",
        description="S3 endpoint URL for MinIO and other S3-compatible stores; AWS when unset.",
    )
    region: str | None = Field(default=None, max_length=64, description="S3 region.")
    credentials_secret: LocalObjectReference | None = Field(
        default=None,
        description=(
            "Secret in the job's namespace with keys AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and optionally "
            "AWS_SESSION_TOKEN). Passed to the pods as env from the secret; its values are never copied anywhere."
        ),
    )


MLFLOW_CREDENTIAL_KEYS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
"""Keys the trainer reads from tracking.mlflow.credentialsSecret (each optional): basic auth or a bearer token."""


class MlflowSpec(_Model):
    """An MLflow tracking server: one run per job (params, per-step metrics, the data report and model
    card as artifacts) and, with registerModel, a model version pointing at the exported model."""

    uri: str = Field(
        max_length=MAX_STR,
        pattern=r"^https?://[^\s/@]+(/[^\s]*)?$",
        description=(
            "MLflow tracking server URL (http or https), without user:password@ (credentials go in credentialsSecret). The operator's allowed endpoints (chart value "
            "storage.allowedEndpoints) apply to it as to storage.endpoint: a job naming another server fails "
            "with EndpointNotAllowed."
        ),
    )
    experiment: str | None = Field(
        default=None, max_length=256, description="Experiment name, created when missing. Default: the job's namespace."
    )
    register_model: str | None = Field(
        default=None,
        max_length=256,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._\-]*$",
        description="Registered model name: when the job succeeds, a new version of it points at <output.uri>/model. Unset: nothing is registered.",
    )
    credentials_secret: LocalObjectReference | None = Field(
        default=None,
        description=(
            "Secret in the job's namespace with MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or "
            "MLFLOW_TRACKING_TOKEN. Passed to the pods as env from the secret (each key optional); its values are "
            "never copied anywhere. Subject to the same label rule as storage.credentialsSecret."
        ),
    )


class TrackingSpec(_Model):
    """Experiment tracking. A tracker that fails never fails or stalls training: the trainer logs one
    warning and says so in status.tracking.problem."""

    tensorboard: bool = Field(
        default=True,
        description=(
            "Write TensorBoard event files (losses, learning rate, tokens/s, eval metrics, the hyperparameters, the "
            "data report as text) to <output.uri>/tensorboard/, uploaded at each checkpoint and at the end: "
            "tensorboard --logdir <output.uri>/tensorboard."
        ),
    )
    mlflow: MlflowSpec | None = Field(default=None, description="Log the run to an MLflow tracking server. Unset: no MLflow.")


class RunPolicy(_Model):
    """Lifecycle limits. The only part of the spec that may change after creation."""

    backoff_limit: int = Field(default=3, ge=0, le=100, description="Group restarts after a pod failure before the job fails.")
    active_deadline_seconds: int | None = Field(default=None, ge=1, description="Fail the job (DeadlineExceeded) when it has run this long.")
    ttl_seconds_after_finished: int | None = Field(default=None, ge=0, description="Delete the finished job and its children after this many seconds.")
    suspend: bool = Field(default=False, description="Stop the pods (the trainer checkpoints on SIGTERM) and keep the job; false resumes.")


# ------------------------------------------------------------------------------------------- the job

_IMMUTABLE = ("model", "method", "lora", "dataset", "hyperparameters", "evaluation", "checkpoint", "output", "resources", "storage",
              "distillation", "tracking", "objective")


def _immutable_rule() -> str:
    parts = []
    for f in _IMMUTABLE:
        parts.append(f"(has(self.{f}) == has(oldSelf.{f}) && (!has(self.{f}) || self.{f} == oldSelf.{f}))")
    return " && ".join(parts)


# Inputs the output prefix must stay clear of (issue 9 §5): the trainer deletes and overwrites under its
# output (old checkpoints, the model folder), so an output that equals, contains or lies inside an
# input would destroy it. Paths as CEL sees them in the spec (optional ones guarded by has()).
_INPUTS = (
    ("model.uri", "self.model.uri", "has(self.model.uri)"),
    ("dataset.train", "self.dataset.train", None),
    ("dataset.validation", "self.dataset.validation", "has(self.dataset.validation)"),
    ("dataset.test", "self.dataset.test", "has(self.dataset.test)"),
    ("evaluation.retention.dataset", "self.evaluation.retention.dataset", "has(self.evaluation) && has(self.evaluation.retention)"),
    ("distillation.teacher.uri", "self.distillation.teacher.uri", "has(self.distillation) && has(self.distillation.teacher.uri)"),
)
_OUTPUT_OVERLAP = "output.uri must not equal, contain or lie inside {field} (the trainer deletes and overwrites under its output)"


def as_prefix(uri: str) -> str:
    """``uri`` with exactly one trailing ``/``: two prefixes overlap when one starts with the other."""
    return uri.rstrip("/") + "/"


def output_overlap(spec: "FineTuneJobSpec") -> str | None:
    """The first input (by spec field name) the output overlaps, or None."""
    out = as_prefix(spec.output.uri)
    retention = spec.evaluation.retention.dataset if spec.evaluation.retention else None
    teacher = spec.distillation.teacher.uri if spec.distillation else None
    values = (spec.model.uri, spec.dataset.train, spec.dataset.validation, spec.dataset.test, retention, teacher)
    for (field_name, _, _), value in zip(_INPUTS, values):
        if value and (out.startswith(as_prefix(value)) or as_prefix(value).startswith(out)):
            return field_name
    return None


def _overlap_rule(path: str, guard: str | None) -> str:
    norm = "(%s.endsWith('/') ? %s : %s + '/')"
    out, inp = norm % (("self.output.uri",) * 3), norm % ((path,) * 3)
    rule = f"!({out}.startsWith({inp}) || {inp}.startsWith({out}))"
    return f"!({guard}) || {rule}" if guard else rule


_REGRESSION_NEEDS_PARENT = "evaluation.regression needs model.fromJob (it compares the new model with its parent job's)"
_FSDP_FULL_ONLY = "hyperparameters.distributedStrategy fsdp needs method full (adapters train few parameters: use ddp or auto)"
_SEQ2SEQ_FORMAT = (
    "model.task seq2seq-lm needs dataset.format prompt-completion (the prompt is the encoder's input, the completion the "
    "decoder's target)"
)
_SEQ2SEQ_PACKING = (
    "model.task seq2seq-lm needs hyperparameters.packing false (encoder-decoder rows are padded, not packed)"
)


class FineTuneJobSpec(_Model):
    """A fine-tuning run: a base model, a dataset, a method and where to write the result."""

    model: ModelSpec = Field(description="The base model and task.")
    method: Method = Field(default=Method.lora, description="full fine-tune, or a parameter-efficient adapter: lora, qlora (4-bit base, GPU only), dora.")
    lora: LoraSpec | None = Field(default=None, description="Adapter settings; only with method lora, qlora or dora.")
    dataset: DatasetSpec = Field(description="Training data, splits and cleaning.")
    objective: ObjectiveSpec | None = Field(
        default=None, description="The training objective: sft (the default when unset), or dpo / simpo on preference pairs."
    )
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters, description="Optimisation settings.")
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec, description="Validation, early stopping, baseline, calibration, retention.")
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec, description="Checkpoint cadence, retention and resume.")
    output: OutputSpec = Field(description="Where checkpoints and the final model are written.")
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec, description="Pods, GPUs, image and placement.")
    storage: StorageSpec = Field(default_factory=StorageSpec, description="S3 endpoint, region and credentials secret.")
    tracking: TrackingSpec = Field(default_factory=TrackingSpec, description="Experiment tracking: TensorBoard event files, MLflow.")
    run_policy: RunPolicy = Field(default_factory=RunPolicy, description="Restarts, deadline, TTL and suspend; may change after creation.")
    distillation: DistillationSpec | None = Field(
        default=None,
        description=(
            "Knowledge distillation from a teacher model: the loss mixes the task loss with the KL divergence of the "
            "temperature-softened outputs (logits), and the report shows the teacher's metrics beside the student's. "
            "causal-lm and sequence-classification only."
        ),
    )

    @model_validator(mode="before")
    @classmethod
    def _packing_default(cls, data: Any) -> Any:
        """hyperparameters.packing when unset: true for a causal LM on the next-token loss, false for seq2seq-lm and
        the preference objectives (their rows are padded), so the stored config says which was used."""
        if not isinstance(data, dict):
            return data

        def part(value: Any, name: str) -> Any:
            got = value.get(name) if isinstance(value, dict) else getattr(value, name, None)
            return getattr(got, "value", got)

        task, objective = part(data.get("model"), "task"), part(data.get("objective"), "type")
        default = not (task == Task.seq2seq_lm.value or objective in PREFERENCE_OBJECTIVES)
        hp = data.get("hyperparameters")
        if hp is None:
            return {**data, "hyperparameters": {"packing": default}}
        if isinstance(hp, dict) and hp.get("packing") is None:
            return {**data, "hyperparameters": {**hp, "packing": default}}
        if isinstance(hp, Hyperparameters) and hp.packing is None:
            return {**data, "hyperparameters": hp.model_copy(update={"packing": default})}
        return data

    @model_validator(mode="after")
    def _cross(self) -> "FineTuneJobSpec":
        if self.lora is not None and self.method not in ADAPTER_METHODS:
            raise ValueError("spec.lora is only valid with method lora, qlora or dora")
        classification = self.is_classification
        if classification != (self.dataset.format == DataFormat.classification.value):
            raise ValueError("dataset.format classification goes with model.task sequence-classification, and only with it")
        if any(m in ("bleu", "rouge") for m in (self.evaluation.metrics or [])) and classification:
            raise ValueError("evaluation.metrics bleu and rouge need task causal-lm or seq2seq-lm")
        if self.is_seq2seq and self.dataset.format != DataFormat.prompt_completion.value:
            raise ValueError(_SEQ2SEQ_FORMAT)
        if self.is_seq2seq and self.hyperparameters.packing:
            raise ValueError(_SEQ2SEQ_PACKING)
        if self.hyperparameters.distributed_strategy == DistributedStrategy.fsdp.value and self.method != Method.full.value:
            raise ValueError(_FSDP_FULL_ONLY)
        if self.distillation is not None and self.model.task not in DISTILLATION_TASKS:
            raise ValueError(_DISTILLATION_TASK_RULE)
        self._preference_rules()
        overlap = output_overlap(self)
        if overlap:
            raise ValueError(_OUTPUT_OVERLAP.format(field=overlap))
        if self.evaluation.regression is not None and self.model.from_job is None:
            raise ValueError(_REGRESSION_NEEDS_PARENT)
        if self.dataset.cross_validation is not None and self.checkpoint.resume not in ("latest", "none"):
            raise ValueError(_CV_RESUME)
        return self

    def _preference_rules(self) -> None:
        if self.is_preference != (self.dataset.format == DataFormat.preference.value):
            raise ValueError(_PREFERENCE_FORMAT)
        if not self.is_preference:
            return
        if self.hyperparameters.packing:
            raise ValueError(_PREFERENCE_PACKING)
        if self.evaluation.retention is not None:
            raise ValueError(_PREFERENCE_RETENTION)
        if self.distillation is not None:
            raise ValueError(_PREFERENCE_DISTILLATION)
        if any(m in ("bleu", "rouge") for m in (self.evaluation.metrics or [])):
            raise ValueError(_PREFERENCE_GENERATION)

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel("!has(self.lora) || self.method in ['lora', 'qlora', 'dora']", "spec.lora is only valid with method lora, qlora or dora"),
                cel(f"({_PREFERENCE}) == (has(self.dataset.format) && self.dataset.format == 'preference')", _PREFERENCE_FORMAT),
                cel(f"!({_PREFERENCE}) || !has(self.hyperparameters) || !has(self.hyperparameters.packing) "
                    "|| !self.hyperparameters.packing", _PREFERENCE_PACKING),
                cel(f"!({_PREFERENCE}) || !has(self.evaluation) || !has(self.evaluation.retention)", _PREFERENCE_RETENTION),
                cel(f"!({_PREFERENCE}) || !has(self.distillation)", _PREFERENCE_DISTILLATION),
                cel(f"!({_PREFERENCE}) || !has(self.evaluation) || !has(self.evaluation.metrics) "
                    "|| !self.evaluation.metrics.exists(m, m in ['bleu', 'rouge'])", _PREFERENCE_GENERATION),
                cel(
                    "(self.model.task == 'sequence-classification') == (self.dataset.format == 'classification')",
                    "dataset.format classification goes with model.task sequence-classification, and only with it",
                ),
                cel("self.model.task != 'seq2seq-lm' || self.dataset.format == 'prompt-completion'", _SEQ2SEQ_FORMAT),
                cel(
                    "self.model.task != 'seq2seq-lm' || !has(self.hyperparameters) || !has(self.hyperparameters.packing) "
                    "|| !self.hyperparameters.packing",
                    _SEQ2SEQ_PACKING,
                ),
                cel(
                    "!has(self.hyperparameters) || !has(self.hyperparameters.distributedStrategy) "
                    "|| self.hyperparameters.distributedStrategy != 'fsdp' || self.method == 'full'",
                    _FSDP_FULL_ONLY,
                ),
                cel(
                    "!has(self.distillation) || self.model.task in [%s]" % ", ".join(f"'{t}'" for t in DISTILLATION_TASKS),
                    _DISTILLATION_TASK_RULE,
                ),
                *(cel(_overlap_rule(path, guard), _OUTPUT_OVERLAP.format(field=name)) for name, path, guard in _INPUTS),
                cel("!has(self.evaluation) || !has(self.evaluation.regression) || has(self.model.fromJob)", _REGRESSION_NEEDS_PARENT),
                cel("!has(self.dataset.crossValidation) || !has(self.checkpoint) || !has(self.checkpoint.resume) "
                    "|| self.checkpoint.resume in ['latest', 'none']", _CV_RESUME),
                cel(
                    _immutable_rule(),
                    "spec is immutable after creation except spec.runPolicy (suspend, backoffLimit, activeDeadlineSeconds, ttlSecondsAfterFinished)",
                    reason="FieldValueForbidden",
                ),
            ]
        }
    )

    @property
    def is_adapter(self) -> bool:
        return self.method in ADAPTER_METHODS

    @property
    def is_classification(self) -> bool:
        """The task is sequence classification (classifier head, class labels, calibration) rather than causal LM."""
        return self.model.task == Task.sequence_classification.value

    @property
    def is_seq2seq(self) -> bool:
        """The model is an encoder-decoder (AutoModelForSeq2SeqLM): prompt in, completion generated."""
        return self.model.task == Task.seq2seq_lm.value

    @property
    def objective_type(self) -> str:
        """sft, dpo or simpo (sft when objective is unset)."""
        kind = self.objective.type if self.objective is not None else ObjectiveType.sft
        return str(getattr(kind, "value", kind))

    @property
    def is_preference(self) -> bool:
        """Trained on preference pairs (objective dpo or simpo) rather than with the next-token loss."""
        return self.objective_type in PREFERENCE_OBJECTIVES

    @property
    def lora_or_default(self) -> LoraSpec:
        return self.lora or LoraSpec()


def parse_spec(spec: dict[str, Any]) -> FineTuneJobSpec:
    """Parse a custom resource's ``spec`` (camelCase) into the typed model."""
    return FineTuneJobSpec.model_validate(spec)
