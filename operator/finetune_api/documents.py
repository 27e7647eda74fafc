"""The documents the trainer writes under ``spec.output.uri`` and the job config it reads.

- ``progress.json`` (:class:`ProgressDocument`, camelCase): rank 0 rewrites it as training goes; the
  operator polls it and projects it into the FineTuneJob status.
- ``data-report.json`` (:class:`DataReport`, snake_case): what data preparation did to every input;
  the model card and people read it, the status carries its :class:`DataSummary`.
- the job config (:class:`JobConfigDocument`): the FineTuneJob as the operator renders it into the
  ConfigMap the trainer gets with ``--config``.

Every field either side writes is declared here, so a reader of one side knows what the other sends.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from finetune_api.spec import FineTuneJobSpec

PROGRESS_FILE = "progress.json"
DATA_REPORT_FILE = "data-report.json"
TEST_SET_FILE = "test-set.parquet"
"""The job's final, tokenised test split (Parquet; ``input_ids`` and ``labels`` or ``label``), for the regression
gate of the jobs that start from this one (``model.fromJob``)."""
MODEL_FOLDER = "model"
MERGED_FOLDER = "merged"


def output_file(output_uri: str, name: str) -> str:
    """``<output>/<name>``: where the trainer writes document ``name`` for ``spec.output.uri``."""
    return output_uri.rstrip("/") + "/" + name


class WireModel(BaseModel):
    """camelCase on the wire, snake_case in Python; unknown keys are ignored (a newer writer)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore", use_enum_values=True)

    def wire(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


# ----------------------------------------------------------------------------------- progress.json


class ReportModel(BaseModel):
    """data-report.json keeps the trainer's snake_case keys; every key is declared (see the tests)."""

    model_config = ConfigDict(extra="allow")




class CheckpointRef(WireModel):
    step: int = Field(description="Optimizer step of the checkpoint.")
    uri: str = Field(description="Where the checkpoint is.")
    metric: float | None = Field(default=None, description="Monitored eval metric at that step.")


class DataSummary(WireModel):
    """Summary of the data report."""

    rows_read: int | None = Field(default=None, description="Rows read from all inputs.")
    rows_kept: int | None = Field(default=None, description="Rows used for training after cleaning.")
    rows_removed: int | None = Field(default=None, description="Rows removed by cleaning.")
    malformed: int | None = Field(default=None, description="Rows that could not be parsed.")
    label_conflicts: int | None = Field(default=None, description="Rows dropped (or kept first) because the same text carries different labels.")
    exact_duplicates: int | None = Field(default=None, description="Exact duplicates removed.")
    near_duplicates: int | None = Field(default=None, description="Near-duplicates removed.")
    pii_redacted: int | None = Field(default=None, description="PII spans replaced by placeholders.")
    leakage: int | None = Field(default=None, description="Validation/test examples also found in train.")
    report_uri: str | None = Field(default=None, description="Full data report.")
    report_digest: str | None = Field(default=None, description="sha256:<hex> of data-report.json as written: what a child job (model.fromJob) records as its parent's data.")


# The baselines a run compares the fine-tuned model with, in the order the model card shows them. Every entry of
# evaluation.baseline (progress.json, the model card) is one of these; the words are the card's.
BASELINES: dict[str, str] = {
    "base_model": "The base model as downloaded, prompted with each evaluation prompt alone (zero-shot): what fine-tuning started from.",
    "k_shot": (
        "The base model with k training examples (drawn with hyperparameters.seed) shown before each prompt, greedy "
        "completions scored with the same metrics: the in-context-learning baseline a fine-tune has to beat."
    ),
    "random_head": (
        "The pretrained encoder with the new, randomly initialised classification head, before any training: what "
        "fine-tuning started from; close to chance by construction, not a real competitor."
    ),
    "parent_model": (
        "The model this job started from with model.fromJob (its parent job's exported model, its head included), "
        "before any training here: what this fine-tune continued from."
    ),
    "majority_class": "Always predicting the most frequent training class: the floor a classifier has to beat to have learnt anything.",
    "linear_probe": (
        "Logistic regression (scikit-learn, standardised features) on the frozen base encoder's mean-pooled features "
        "of the training set: the fair no-fine-tune baseline of an encoder."
    ),
}
STARTING_POINTS = {"causal-lm": "base_model", "sequence-classification": "random_head", "seq2seq-lm": "base_model"}
"""The baseline the headline gain is measured from, per task: the weights fine-tuning started from (``parent_model``
instead for a job with model.fromJob, whose weights, a classifier's head included, are its parent's)."""


class Gain(WireModel):
    metric: str | None = Field(default=None, description="Metric compared.")
    baseline: float | None = Field(default=None, description="The baseline's value (baselineKind, on split), before fine-tuning.")
    final: float | None = Field(default=None, description="Fine-tuned model on the same split.")
    split: str | None = Field(
        default=None, description="Where both were measured: test when there is a test set (validation chose the checkpoint), else validation."
    )
    baseline_kind: str | None = Field(
        default=None, description=(
            "Which baseline: base_model (causal LM), random_head (classification: encoder + untrained head), or "
            "parent_model (model.fromJob: the parent's model before this job trained it)."
        ),
    )


TENSORBOARD_DIR = "tensorboard"
"""``<output>/tensorboard/``: the TensorBoard event files (spec.tracking.tensorboard)."""


class TrackingSummary(WireModel):
    """Where the run's tracking went (spec.tracking), and why a tracker stopped, if one did."""

    tensorboard_uri: str | None = Field(default=None, description="TensorBoard log folder: tensorboard --logdir <this>.")
    mlflow_run_id: str | None = Field(default=None, description="The job's MLflow run.")
    mlflow_experiment_id: str | None = Field(default=None, description="Its experiment.")
    mlflow_model_version: str | None = Field(default=None, description="Version of tracking.mlflow.registerModel created for the exported model.")
    problem: str | None = Field(
        default=None, max_length=1024,
        description="Why a tracker stopped (one line per tracker; training went on without it). Unset when all went well.",
    )


class BaselineReport(ReportModel):
    """``evaluation.baseline``: every baseline of the run, measured before training on one split (see :data:`BASELINES`).

    Metric dicts are keyed like the other evaluations (``eval_loss``, ``accuracy``, ``bleu``, ...)."""

    split: str = Field(description="test when there is a test set, else validation: the split the final model is compared on.")
    reference: str = Field(description="The baseline the headline gain is measured from (STARTING_POINTS).")
    base_model: dict[str, Any] | None = None
    k_shot: dict[str, Any] | None = None
    k: int | None = Field(default=None, description="Demonstrations in each k_shot prompt (evaluation.fewShotExamples).")
    k_shot_train_rows: list[int] | None = Field(default=None, description="The training rows shown, by index in the prepared train set.")
    random_head: dict[str, Any] | None = None
    parent_model: dict[str, Any] | None = None
    majority_class: dict[str, Any] | None = None
    linear_probe: dict[str, Any] | None = None
    descriptions: dict[str, str] = Field(default_factory=dict, description="What each measured baseline is (BASELINES).")

    def measured(self) -> dict[str, dict[str, Any]]:
        """The baselines that were measured, kind -> metrics, in :data:`BASELINES` order."""
        return {kind: getattr(self, kind) for kind in BASELINES if getattr(self, kind, None)}


class CalibrationReport(ReportModel):
    """``evaluation.calibration`` (classification): temperature scaling fitted on validation, its effect measured on
    validation (optimistic: where it was fitted) and on test (unbiased)."""

    temperature: float
    fitted_on: str = "validation"
    ece_before: float = Field(description="Validation ECE at temperature 1.")
    ece_after: float = Field(description="Validation ECE at the fitted temperature.")
    nll_before: float
    nll_after: float
    test_ece_before: float | None = Field(default=None, description="Test ECE at temperature 1 (None without a test set).")
    test_ece_after: float | None = Field(default=None, description="Test ECE at the fitted temperature.")
    test_nll_before: float | None = None
    test_nll_after: float | None = None


class EvaluationSummary(WireModel):
    """The evaluations of the finished run (metric name -> value, as in the model card)."""

    baseline: BaselineReport | None = Field(default=None, description="Every baseline, measured before training on the comparison split.")
    final: dict[str, Any] | None = Field(default=None, description="Fine-tuned model on the validation set.")
    test: dict[str, Any] | None = Field(default=None, description="Fine-tuned model on the test set.")
    calibration: CalibrationReport | None = Field(default=None, description="Temperature scaling and ECE before/after on validation and test (classification).")
    retention: dict[str, Any] | None = Field(default=None, description="Retention-set loss before/after and the verdict.")
    teacher: dict[str, Any] | None = Field(
        default=None, description="spec.distillation: the teacher's uri, precision, temperature, alpha and its metrics on validation and test."
    )


class RegressionResult(WireModel):
    """The regression gate (``evaluation.regression``): the new model against its parent on the parent's test set."""

    metric: str = Field(description="Metric compared.")
    direction: str = Field(description="max when higher is better, min when lower is.")
    parent: float | None = Field(default=None, description="The parent's recorded value on its test set (its progress.json evaluation.test).")
    child: float | None = Field(default=None, description="This job's model on the same test rows.")
    drop: float | None = Field(default=None, description="How much worse the new model is (positive: worse), in the metric's units.")
    max_drop: float = Field(description="evaluation.regression.maxDrop.")
    passed: bool = Field(description="drop <= maxDrop.")
    action: str = Field(description="warn or fail.")
    test_rows: int | None = Field(default=None, description="Rows of the parent's test set evaluated.")


class FoldResult(WireModel):
    """One fold of ``dataset.crossValidation``: what it trained and validated on, and its validation metrics."""

    fold: int = Field(description="Fold number, 1 to folds.")
    train_rows: int = Field(description="Rows of the other folds it trained on.")
    validation_rows: int = Field(description="Rows of this fold it validated on (after the per-fold leakage rule).")
    steps: int = Field(description="Optimizer steps it ran.")
    step: int | None = Field(default=None, description="The step its metrics are from: the best checkpoint's with evaluation.useBestModel, else the last.")
    metrics: dict[str, float] = Field(default_factory=dict, description="Validation metrics of the fold's model (eval_loss, accuracy, ...).")


class CrossValidationSummary(WireModel):
    """``dataset.crossValidation``: every finished fold and, per metric, the mean and (population, numpy's default)
    standard deviation over the finished folds."""

    folds: int = Field(description="K, the number of folds.")
    stratified: bool = Field(description="Folds keep the class proportions (StratifiedKFold).")
    current_fold: int | None = Field(default=None, description="The fold training now (1 to folds); unset during the refit and after.")
    results: list[FoldResult] = Field(default_factory=list, description="The finished folds, in order.")
    mean: dict[str, float] | None = Field(default=None, description="Mean of each metric over the finished folds.")
    std: dict[str, float] | None = Field(default=None, description="Standard deviation (ddof 0) of each metric over the finished folds.")
    final_model: str = Field(default="refit", description="What was exported: refit, a model trained on all non-test rows after the folds.")


class Lineage(WireModel):
    """Where a job with ``model.fromJob`` started: resolved by the operator from the parent FineTuneJob before
    the first pod, kept in status.lineage and the model card (the regression gate's result is status.regression)."""

    parent_job: str = Field(description="The parent FineTuneJob (same namespace).")
    parent_uid: str | None = Field(default=None, description="Its metadata.uid, so a re-created parent of the same name is told apart.")
    parent_model_uri: str = Field(description="The parent's exported model this job started from (a full or merged model, or an adapter).")
    base_model_uri: str | None = Field(
        default=None, description="When parentModelUri is an adapter: the model folder its adapters are merged into (the first job's model.uri)."
    )
    adapters: list[str] | None = Field(
        default=None, description="When parentModelUri is an adapter: the adapters merged into baseModelUri, oldest first (the last is parentModelUri)."
    )
    parent_output_uri: str | None = Field(default=None, description="The parent's output.uri (its progress.json holds its test metrics).")
    parent_data_report_digest: str | None = Field(default=None, description="sha256 of the parent's data-report.json.")
    parent_test_set_uri: str | None = Field(default=None, description="The parent's stored test split, on which the regression gate evaluates this job's model.")


class ProgressDocument(WireModel):
    """What the trainer writes to <output>/progress.json (rank 0 only).

    Assignments are validated (the trainer updates fields one by one) and keys this version does not
    know are kept, so a reader passes a newer trainer's document on unchanged."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    stage: str = "starting"
    step: int = 0
    total_steps: int | None = None
    epoch: float = 0.0
    eta_seconds: float | None = None
    train_loss: float | None = None
    eval_loss: float | None = None
    learning_rate: float | None = None
    best_metric: float | None = None
    best_metric_name: str | None = None
    latest_checkpoint: str | None = None
    checkpoints: list[CheckpointRef] = Field(default_factory=list)
    model_uri: str | None = None
    data: DataSummary | None = None
    gain: Gain | None = None
    evaluation: EvaluationSummary | None = None
    tracking: TrackingSummary | None = None
    failure_reason: str | None = None
    """The trainer's ``Reason: message`` line when it failed (stage ``failed``)."""
    test_set_uri: str | None = None
    """Where the trainer stored its test split (:data:`TEST_SET_FILE`), for jobs that start from this one."""
    regression: RegressionResult | None = None
    """With model.fromJob: the regression gate's result."""
    fold: int | None = None
    """With dataset.crossValidation: the fold training now (1 to folds); unset during the refit."""
    cross_validation: CrossValidationSummary | None = None
    """With dataset.crossValidation: the folds' results and their mean and standard deviation."""
    updated_at: str | None = None


# -------------------------------------------------------------------------------- data-report.json


class DuplicateExample(ReportModel):
    """A dropped duplicate and the kept row it repeats, as compared: the dedupe key (``preprocessing.dedupe.key``)
    after cleaning and redaction, aggressively normalised and casefolded, cut to 200 characters."""

    match: str = Field(description="exact or near.")
    row: str = Field(description="The dropped row (file:line).")
    text: str
    duplicate_of: str = Field(description="The earlier row it duplicates (file:line).")
    duplicate_of_text: str
    similarity: float = Field(description="Estimated Jaccard similarity of the two keys' word 5-grams (1.0 for exact).")


class InputCounts(ReportModel):
    """What each step did to one input (train, validation, test or retention). A dropped row is counted
    at the first step that drops it."""

    uri: str
    files: int
    rows_read: int
    malformed: int
    empty: int
    exact_duplicates: int
    near_duplicates: int
    too_short: int
    too_long: int
    no_trainable_tokens: int
    rows_kept: int
    truncated: int
    tokens: int
    trainable_tokens: int
    pii: dict[str, int]
    pii_total: int
    malformed_examples: list[dict[str, str]]
    label_conflicts: int = 0
    """Classification rows dropped because the same text has another label (``preprocessing.labelConflicts``)."""
    label_conflict_examples: list[dict[str, Any]] = Field(default_factory=list)
    """Up to 5 of them: ``row`` (file:line), ``labels`` (the first label seen for the text, then this row's),
    ``text`` (the cleaned, redacted text, cut to 200 characters)."""
    duplicate_examples: list[DuplicateExample] = Field(default_factory=list)
    """Up to 5 exact and 5 near duplicates, each beside the earlier row it duplicates."""


class Totals(ReportModel):
    """The sums of the job's own inputs (train, validation, test; not retention)."""

    rows_read: int
    malformed: int
    empty: int
    exact_duplicates: int
    near_duplicates: int
    too_short: int
    too_long: int
    no_trainable_tokens: int
    rows_kept: int
    truncated: int
    tokens: int
    trainable_tokens: int
    pii_total: int
    pii: dict[str, int]
    label_conflicts: int = 0


class SplitInfo(ReportModel):
    """How validation/test were obtained: ``files`` (given), ``none``, or ``ratio`` (split off train)."""

    method: str
    seed: int | None = None
    validation_fraction: float | None = None
    test_fraction: float | None = None
    stratified: bool | None = None
    stratify_fallback: str | None = None
    given_files: list[str] | None = None


class LeakageExample(ReportModel):
    """An evaluated row beside the row it matches, both as compared (the leakage key, cleaned, redacted,
    aggressively normalised and casefolded, cut to 200 characters)."""

    split: str = Field(description="The split the row is in: validation, test or retention.")
    match: str = Field(description="exact or near.")
    row: str
    text: str
    matched_split: str = Field(description="The split it is found in: train or validation.")
    matched_row: str
    matched_text: str
    similarity: float


class LeakageFinding(ReportModel):
    exact: int
    near: int
    total: int
    examples: list[LeakageExample]
    dropped: int | None = None


class LeakageReport(ReportModel):
    """Each check compares an evaluated split with a reference split by ``dataset.leakageKey``."""

    policy: str
    key: str | None = None
    validation: LeakageFinding | None = None
    """Validation rows found in train."""
    test: LeakageFinding | None = None
    """Test rows found in train."""
    test_vs_validation: LeakageFinding | None = None
    """Test rows (not already found in train) found in validation."""
    retention: LeakageFinding | None = None
    """Retention rows found in train."""
    total: int | None = None
    """Validation and test rows found in train (what the status's data summary shows)."""
    all_checks_total: int | None = None
    """Rows found by every check, test-in-validation and retention-in-train included."""


class FoldReport(ReportModel):
    fold: int
    train_rows: int
    validation_rows: int
    leakage: LeakageFinding | None = None
    """This fold's validation rows found in its training folds."""


class CrossValidationReport(ReportModel):
    """The folds of ``dataset.crossValidation`` (made from the training rows, the test split left out)."""

    folds: int
    seed: int
    stratified: bool
    stratify_fallback: str | None = None
    rows: int
    fold_reports: list[FoldReport]
    leakage_total: int


class ClassBalance(ReportModel):
    counts: dict[str, int]
    imbalance_ratio: float | None
    classes_without_rows: list[str]


class ClassesReport(ReportModel):
    labels: list[str]
    source: str
    train: ClassBalance
    validation: ClassBalance | None = None
    test: ClassBalance | None = None
    class_weights: list[float] | None = None


class PiiKind(ReportModel):
    kind: str = Field(description="The placeholder's name (EMAIL, PHONE, SECRET, ...), as counted in pii.")
    what: str = Field(description="What was looked for under it, and how it was checked.")


class PiiCoverage(ReportModel):
    """Which kinds of PII redaction looked for, and which it did not (the same list the model card shows)."""

    regions: list[str] = Field(description="preprocessing.piiRegions: national phone and identity-number formats looked for.")
    looked_for: list[PiiKind]
    not_looked_for: list[str] = Field(description="Kinds of personal data that were not detected, so may remain in the data.")


class DataReport(ReportModel):
    """data-report.json, written once by rank 0 after data preparation."""

    format: str
    task: str
    max_seq_length: int
    preprocessing: dict[str, Any]
    pii_coverage: PiiCoverage | None = None
    inputs: dict[str, InputCounts]
    total: Totals
    split: SplitInfo
    leakage: LeakageReport
    classes: ClassesReport | None
    final_sizes: dict[str, int | None]
    cross_validation: CrossValidationReport | None = None


def undeclared_keys(model: BaseModel, where: str = "") -> list[str]:
    """Paths of the keys ``model`` (and the models inside it) accepted without declaring them."""
    out = [f"{where}{key}" for key in (model.model_extra or {})]
    for name in type(model).model_fields:
        value = getattr(model, name)
        children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else [(None, value)]
        for key, child in children:
            if isinstance(child, BaseModel):
                out += undeclared_keys(child, f"{where}{name}{'' if key is None else f'[{key}]'}.")
    return out


# -------------------------------------------------------------------------------------- job config


class JobMetadata(WireModel):
    name: str
    namespace: str | None = None
    uid: str | None = None
    generation: int | None = None


class JobConfigDocument(WireModel):
    """The trainer's ``--config``: the FineTuneJob with every spec default filled in (the operator's
    ConfigMap), or, run by hand, a manifest written by a person."""

    api_version: str
    kind: str
    metadata: JobMetadata
    spec: FineTuneJobSpec
