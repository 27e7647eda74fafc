"""Continuous fine-tuning (``model.fromJob``): start from a parent job's model, and do not go backwards.

The operator resolves the parent FineTuneJob before the first pod (``finetune_operator.lineage``) and
passes what it found as ``FINETUNE_PARENT_*`` variables (:mod:`finetune_api.env`); :meth:`Parent.from_env`
reads them back into the same :class:`~finetune_api.documents.Lineage` the FineTuneJob's status shows.

- The base: a full or merged parent model is loaded as is. An adapter parent comes as a chain (the first
  job's base model, then every adapter since, oldest first): :func:`merge_adapters` folds the chain into one
  plain model folder (once per node, cached), and this job trains on top of it like on any base model: a
  new adapter (lora/dora/qlora) or all weights (full). Merging first, rather than training the parent's own
  adapter further, lets the child choose its method and adapter shape freely; its adapter then sits on the
  merged parent, which its own lineage (base + adapters) names for the next job.
- Every job stores its final, tokenised test split (:func:`save_test_set`, ``<output>/test-set.parquet``), and
  the regression gate (:func:`regression_gate`) evaluates the new model on the parent's, against the value the
  parent recorded there (its ``progress.json``). ``evaluation.regression`` says how much worse is allowed and
  whether a worse model only warns or fails the job before anything is exported.

The parent's files are tenant-controlled input like any dataset: read with this job's storage settings, under
``dataset.limits.maxFileBytes``, and checked for the shape this trainer writes before use.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune_api import env as pod_env
from finetune_api import metric_catalogue
from finetune_api.documents import PROGRESS_FILE, TEST_SET_FILE, Lineage, ProgressDocument, RegressionResult, output_file
from finetune_api.spec import FineTuneJobSpec, RegressionSpec

from .errors import InvalidConfig, ParentModelInvalid, RegressionDetected

if TYPE_CHECKING:
    import datasets

    from .distributed import DistInfo
    from .storage import Storage

log = logging.getLogger(__name__)

MAX_PARENT_PROGRESS_BYTES = 8 << 20  # a progress.json is a few kB; more is not one this trainer wrote
DIGEST_PREFIX = "sha256:"


# ------------------------------------------------------------------------------------- the parent


@dataclass(frozen=True)
class Parent:
    """The resolved ``model.fromJob`` (what the operator put in status.lineage)."""

    lineage: Lineage

    @property
    def adapters(self) -> list[str]:
        return list(self.lineage.adapters or [])

    @property
    def model_source(self) -> str:
        """The model folder to download first: the parent's model itself, or the base its adapters sit on."""
        return self.lineage.base_model_uri or self.lineage.parent_model_uri

    @classmethod
    def from_env(cls, spec: FineTuneJobSpec, environ: dict[str, str] | None = None) -> Parent | None:
        """None without ``model.fromJob``; else the lineage from the operator's variables."""
        if spec.model.from_job is None:
            return None
        environ = dict(os.environ if environ is None else environ)
        model_uri = environ.get(pod_env.PARENT_MODEL_URI)
        if not model_uri:
            raise InvalidConfig(
                f"model.fromJob {spec.model.from_job.name!r} is resolved by the operator, which sets {pod_env.PARENT_MODEL_URI} "
                f"and the other {', '.join(pod_env.LINEAGE)} variables; run the job through the operator, or use model.uri "
                "with the parent's model URI when running the trainer by hand")
        adapters = json.loads(environ[pod_env.PARENT_ADAPTERS]) if environ.get(pod_env.PARENT_ADAPTERS) else None
        if adapters is not None and not (isinstance(adapters, list) and all(isinstance(a, str) for a in adapters)):
            raise InvalidConfig(f"{pod_env.PARENT_ADAPTERS} must be a JSON list of URIs")
        lineage = Lineage(
            parent_job=environ.get(pod_env.PARENT_JOB) or spec.model.from_job.name,
            parent_model_uri=model_uri,
            base_model_uri=environ.get(pod_env.PARENT_BASE_MODEL_URI) or None,
            adapters=adapters,
            parent_output_uri=environ.get(pod_env.PARENT_OUTPUT_URI) or None,
            parent_data_report_digest=environ.get(pod_env.PARENT_DATA_REPORT_DIGEST) or None,
            parent_test_set_uri=environ.get(pod_env.PARENT_TEST_SET_URI) or None,
        )
        if bool(lineage.base_model_uri) != bool(adapters):
            raise InvalidConfig(f"{pod_env.PARENT_BASE_MODEL_URI} and {pod_env.PARENT_ADAPTERS} go together (an adapter parent)")
        return cls(lineage)


def effective_spec(spec: FineTuneJobSpec, parent: Parent | None) -> FineTuneJobSpec:
    """``spec`` with model.uri set to the parent's model, so that logs, errors and the model card name the model
    this job started from. Only the trainer's in-memory copy: the FineTuneJob keeps fromJob."""
    if parent is None:
        return spec
    return spec.model_copy(update={"model": spec.model.model_copy(update={"uri": parent.lineage.parent_model_uri})})


def merge_adapters(base_dir: str, parent: Parent, spec: FineTuneJobSpec, storage: Storage, dist: DistInfo, *,
                   labels: list[str] | None, cache_root: Path) -> str:
    """The parent's adapter chain merged into ``base_dir``: a plain model folder, made by local rank 0 once per node."""
    from .distributed import launch_key, local_main_works

    key = hashlib.sha256(json.dumps([parent.model_source, parent.adapters, labels]).encode()).hexdigest()[:16]
    local = cache_root / "models" / f"{key}-merged"
    marker = local / ".complete"
    if marker.exists():
        return str(local)

    def work() -> str:
        _merge(base_dir, parent, spec, storage, labels=labels, dest=local, downloads=cache_root / "adapters")
        return str(local)

    failed = local.with_name(f"{local.name}.failed-{launch_key()}")
    return local_main_works(dist, work, lambda: str(local), done=marker, failed=failed, what="merge the parent's adapters",
                            timeout_s=6 * 3600, timeout_error=ParentModelInvalid, poll_s=1.0)


def _merge(base_dir: str, parent: Parent, spec: FineTuneJobSpec, storage: Storage, *, labels: list[str] | None, dest: Path,
           downloads: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoTokenizer

    trust = spec.model.trust_remote_code
    config = AutoConfig.from_pretrained(base_dir, trust_remote_code=trust)
    if spec.is_classification:
        names = labels or [str(i) for i in range(spec.model.num_labels or 0)]
        if not names:
            raise InvalidConfig("sequence-classification needs labels: set model.labels or model.numLabels")
        config.num_labels = len(names)
        config.id2label = dict(enumerate(names))
        config.label2id = {n: i for i, n in enumerate(names)}
    from .model import auto_model_class

    auto = auto_model_class(spec)  # the task's head: a classifier, a causal LM or an encoder-decoder
    model = auto.from_pretrained(base_dir, config=config, dtype=torch.float32, trust_remote_code=trust)
    for uri in parent.adapters:
        folder = downloads / hashlib.sha256(uri.encode()).hexdigest()[:16]
        prefix = uri.rstrip("/") + "/"
        try:
            files = storage.list(prefix)
        except FileNotFoundError:
            files = []
        if prefix + "adapter_config.json" not in files:
            raise ParentModelInvalid(f"the parent's adapter {uri} holds no adapter_config.json (model.fromJob {parent.lineage.parent_job})")
        storage.download_prefix(prefix, folder)
        try:
            model = PeftModel.from_pretrained(model, str(folder)).merge_and_unload()
        except Exception as e:  # noqa: BLE001 - a mismatched head (other labels) or a broken file
            raise ParentModelInvalid(
                f"cannot apply the parent's adapter {uri} to {parent.model_source}: {str(e).strip().splitlines()[0][:300]} "
                "(a classifier must keep the parent's labels)") from None
    log.info("merged %d adapter(s) of the parent %s into %s", len(parent.adapters), parent.lineage.parent_job, parent.model_source)
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(dest), safe_serialization=True)
    AutoTokenizer.from_pretrained(base_dir, trust_remote_code=trust).save_pretrained(str(dest))


# ------------------------------------------------------------------------------ documents it leaves


def report_bytes(report: Any) -> tuple[bytes, str]:
    """data-report.json's bytes, as written, and their digest (``sha256:<hex>``): what a child records."""
    body = (json.dumps(report, indent=2, sort_keys=False, default=str) + "\n").encode()
    return body, DIGEST_PREFIX + hashlib.sha256(body).hexdigest()


def save_test_set(dataset: datasets.Dataset | None, labels: list[str] | None, *, work_dir: Path, storage: Storage, output: str) -> str | None:
    """Store the final test split as ``<output>/test-set.parquet`` (token ids; a classifier's labels by name, so a
    child maps them onto its own label ids); its URI, or None without a test split."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if dataset is None or len(dataset) == 0:
        return None
    table = dataset.with_format("arrow")[0 : len(dataset)]  # honours a selection (indices mapping)
    if labels is None:
        out = pa.table({"input_ids": table.column("input_ids"), "labels": table.column("labels")})
    else:
        names = pa.array(labels, type=pa.string()).take(table.column("label"))
        out = pa.table({"input_ids": table.column("input_ids"), "label_name": names})
    local = work_dir / TEST_SET_FILE
    pq.write_table(out, str(local), compression="zstd")
    uri = output_file(output, TEST_SET_FILE)
    storage.upload_file(local, uri)
    local.unlink(missing_ok=True)
    return uri


# ------------------------------------------------------------------------------ reading the parent's


def load_parent_test_set(parent: Parent, spec: FineTuneJobSpec, storage: Storage, *, work_dir: Path, labels: list[str] | None,
                         vocab_size: int, rank: int = 0) -> datasets.Dataset:
    """The parent's stored test split, checked: the columns this trainer writes, within dataset.limits.maxFileBytes
    (on disk and decoded), token ids inside the vocabulary, class names among this job's labels."""
    import datasets
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    uri = parent.lineage.parent_test_set_uri
    assert uri is not None
    where = f"the parent's test set {uri} (model.fromJob {parent.lineage.parent_job})"
    cap = spec.dataset.limits.file_bytes
    local = work_dir / f"parent-{TEST_SET_FILE}.{rank}"
    try:
        storage.download(uri, local)
    except FileNotFoundError:
        raise ParentModelInvalid(f"{where} does not exist") from None
    if local.stat().st_size > cap:
        raise ParentModelInvalid(f"{where} is {local.stat().st_size} bytes, over dataset.limits.maxFileBytes ({cap})")
    try:
        # Class names stay dictionary-encoded (a long name repeated in every row is never expanded); token ids are
        # measured as 8 bytes a value, whatever their encoding, before anything is decoded.
        label_column = "label_name" if labels is not None else "labels"
        columns = pq.ParquetFile(str(local)).schema_arrow.names
        if set(columns) != {"input_ids", label_column}:
            raise ParentModelInvalid(f"{where} has columns {columns}, expected input_ids and {label_column} "
                                     "(the parent and this job must have the same task)")
        file = pq.ParquetFile(str(local), read_dictionary=["label_name"] if labels is not None else None)
        meta = file.metadata
        decoded = sum(max(meta.row_group(i).column(j).total_uncompressed_size, 8 * meta.row_group(i).column(j).num_values)
                      for i in range(meta.num_row_groups) for j in range(meta.num_columns))
        if decoded > cap:
            raise ParentModelInvalid(f"{where} decodes to {decoded} bytes, over dataset.limits.maxFileBytes ({cap})")
        table = file.read()
    except ParentModelInvalid:
        raise
    except Exception as e:  # noqa: BLE001 - not a Parquet file this trainer wrote
        raise ParentModelInvalid(f"{where} is not readable Parquet: {str(e)[:200]}") from None
    finally:
        local.unlink(missing_ok=True)
    try:
        ids = pc.list_flatten(table.column("input_ids"))
        if len(ids) and (pc.min(ids).as_py() < 0 or pc.max(ids).as_py() >= vocab_size):
            raise ParentModelInvalid(f"{where} holds token ids outside this model's vocabulary (0..{vocab_size - 1})")
        if labels is None:
            target = pc.list_flatten(table.column("labels"))
            if len(target) and (pc.max(target).as_py() >= vocab_size or pc.min(target).as_py() < -100):
                raise ParentModelInvalid(f"{where} holds label ids outside this model's vocabulary")
            out = pa.table({"input_ids": table.column("input_ids").cast(pa.list_(pa.int32())),
                            "labels": table.column("labels").cast(pa.list_(pa.int32()))})
        else:
            names = table.column("label_name").combine_chunks()
            if not pa.types.is_dictionary(names.type):
                names = names.dictionary_encode()
            known = pc.index_in(names.dictionary, value_set=pa.array(labels, type=pa.string()))  # per distinct name
            used = pc.unique(names.indices)
            missing = [names.dictionary[i].as_py() for i in used.to_pylist() if known[i].as_py() is None]
            if missing:
                raise ParentModelInvalid(f"{where} has labels {sorted(str(m)[:64] for m in missing)[:5]} that this job's labels {labels} lack")
            label_ids = pc.take(known, names.indices)
            out = pa.table({"input_ids": table.column("input_ids").cast(pa.list_(pa.int32())), "label": label_ids.cast(pa.int64())})
    except ParentModelInvalid:
        raise
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as e:
        raise ParentModelInvalid(f"{where} does not have the types this trainer writes: {str(e)[:200]}") from None
    return datasets.Dataset(out)


def parent_test_metrics(parent: Parent, storage: Storage) -> dict[str, Any]:
    """What the parent recorded for its model on its test set (its progress.json evaluation.test)."""
    out = parent.lineage.parent_output_uri
    if not out:
        raise ParentModelInvalid(f"model.fromJob {parent.lineage.parent_job}: the operator passed no {pod_env.PARENT_OUTPUT_URI}")
    uri = output_file(out, PROGRESS_FILE)
    try:
        body = storage.read_bytes_at_most(uri, MAX_PARENT_PROGRESS_BYTES)
    except FileNotFoundError:
        raise ParentModelInvalid(f"the parent's {uri} does not exist") from None
    if len(body) > MAX_PARENT_PROGRESS_BYTES:
        raise ParentModelInvalid(f"the parent's {uri} is over {MAX_PARENT_PROGRESS_BYTES} bytes: not a progress document")
    try:
        doc = ProgressDocument.model_validate_json(body)
    except ValueError as e:
        raise ParentModelInvalid(f"the parent's {uri} is not a progress document: {str(e).splitlines()[0][:200]}") from None
    test = (doc.evaluation.test if doc.evaluation else None) or {}
    return {k: v for k, v in test.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


# --------------------------------------------------------------------------------------- the gate


def headline_metric(classification: bool, monitor: str) -> str:
    """The metric a run's gain is reported on: the monitored one, accuracy for a classifier monitoring its loss."""
    return "accuracy" if classification and monitor == "eval_loss" else monitor


def gate_metric(spec: FineTuneJobSpec, monitor: str) -> str:
    """evaluation.regression.metric, or the headline metric; checked to be one the test evaluation computes."""
    regression = spec.evaluation.regression
    metric = (regression.metric if regression else None) or headline_metric(spec.is_classification, monitor)
    computed = metric_catalogue.monitorable(spec.model.task)
    if metric not in computed:
        raise InvalidConfig(f"evaluation.regression.metric {metric!r} is not computed on a test set for this task; "
                            f"use one of {', '.join(computed)}")
    return metric


def regression_gate(metric: str, parent_value: float | None, child_value: float | None, spec: RegressionSpec | None,
                    *, test_rows: int | None = None) -> RegressionResult:
    """The verdict: how much worse (in the metric's units, positive = worse) the child is than the parent. A child
    value that is missing or not finite (a diverged model) does not pass; :func:`enforce` acts on the verdict."""
    spec = spec or RegressionSpec()
    direction = metric_catalogue.direction(metric) or "min"
    drop: float | None = None
    if parent_value is not None and child_value is not None:
        drop = (parent_value - child_value) if direction == "max" else (child_value - parent_value)
    passed = drop is not None and math.isfinite(drop) and drop <= spec.max_drop
    result = RegressionResult(metric=metric, direction=direction, parent=parent_value, child=child_value,
                              drop=drop if drop is None or math.isfinite(drop) else None, max_drop=spec.max_drop,
                              passed=passed, action=spec.action, test_rows=test_rows)
    return result


def enforce(result: RegressionResult) -> None:
    """Raise :class:`RegressionDetected` for a failed gate with action fail; log a warning with action warn."""
    if result.passed:
        return
    if result.action == "fail":
        worse = f"by {result.drop:.4g}" if result.drop is not None else "(no finite value)"
        raise RegressionDetected(
            f"on the parent's test set {result.metric} went from {result.parent} (parent) to {result.child} (this model), worse "
            f"{worse}, more than evaluation.regression.maxDrop {result.max_drop}: no model exported. Lower the learning rate or "
            "epochs, add the parent's data to train, or raise maxDrop / set action warn")
    log.warning("regression gate failed: %s %s -> %s (drop %s > maxDrop %s), action warn", result.metric, result.parent,
                result.child, result.drop, result.max_drop)


def lineage_card(parent: Parent, regression: RegressionResult | None) -> dict[str, Any]:
    """The model card's ``lineage`` entry."""
    return {**parent.lineage.wire(), "regression": regression.wire() if regression else None}


def lineage_markdown(card: dict[str, Any] | None) -> str:
    """The model card README's Lineage section ('' without a parent)."""
    if not card:
        return ""
    lines = ["", "## Lineage", "", f"Continued from FineTuneJob `{card['parentJob']}`, model `{card['parentModelUri']}`."]
    if card.get("baseModelUri"):
        lines.append(f"That model is an adapter chain on `{card['baseModelUri']}`: " + ", ".join(f"`{a}`" for a in card.get("adapters") or []) + ".")
    if card.get("parentDataReportDigest"):
        lines.append(f"Parent's data report: `{card['parentDataReportDigest']}`.")
    reg = card.get("regression")
    if reg:
        verdict = "passed" if reg["passed"] else f"FAILED (action {reg['action']})"
        lines.append(f"Regression gate on the parent's test set ({reg.get('testRows')} rows): {reg['metric']} parent {reg.get('parent')} -> "
                     f"this model {reg.get('child')}, drop {reg.get('drop')} (maxDrop {reg['maxDrop']}): {verdict}.")
    return "\n".join(lines) + "\n"
