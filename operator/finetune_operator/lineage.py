"""``model.fromJob``: from a FineTuneJob's name to the model it exported, as pure functions.

:func:`exported_model` reads a finished FineTuneJob (its spec and status, as the API server holds them)
and says what it published: a full model folder (method full, or an adapter's merged copy with
``output.mergeAdapter``), or an adapter together with the base it sits on. It is the one answer to
"FineTuneJob name -> exported model URI"; :func:`resolve_teacher` uses it for ``distillation.teacher.fromJob``.

:func:`resolve_parent` is the decision a child makes about its parent before its first pod: start (with
the :class:`~finetune_api.documents.Lineage` to record in status and to hand to the trainer), wait (the
parent has not finished), or fail (no such parent, it failed, or what it left is not usable). The handler
reads the parent object (one GET, same namespace only) and :func:`finetune_operator.state.decide` calls
this; nothing here does I/O.

An adapter parent is given to the trainer as a chain: the first job's base model plus every adapter
since, oldest first. The trainer merges the chain into one model and trains on top of it (a new adapter,
or all weights), so a child's own adapter again sits on a base its lineage names, however deep the chain.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from pydantic import ValidationError

from finetune_api import env as pod_env
from finetune_api.documents import MERGED_FOLDER, Lineage
from finetune_api.failures import PARENT_JOB_FAILED, PARENT_JOB_NOT_FOUND, WAITING_FOR_PARENT_JOB
from finetune_api.spec import FineTuneJobSpec, as_prefix
from finetune_api.status import Phase

T = TypeVar("T")


@dataclass(frozen=True)
class ExportedModel:
    """What a succeeded FineTuneJob published. ``base_model_uri`` is None for a full model; for an adapter it
    is the model folder that ``adapters`` (oldest first, ending with ``model_uri``) are merged into."""

    model_uri: str
    base_model_uri: str | None = None
    adapters: tuple[str, ...] = ()

    @property
    def is_adapter(self) -> bool:
        return self.base_model_uri is not None


class NotExported(ValueError):
    """The job has no model a child can start from; the message says why."""


def _spec_of(body: Mapping[str, Any]) -> FineTuneJobSpec:
    try:
        return FineTuneJobSpec.model_validate(dict(body.get("spec") or {}))
    except ValidationError as err:
        raise NotExported(f"its spec does not validate ({err.error_count()} error(s))") from None


def exported_model(body: Mapping[str, Any]) -> ExportedModel:
    """The model a *succeeded* FineTuneJob ``body`` exported (its status.modelUri), as a child loads it.

    Raises :class:`NotExported` when there is none (no status.modelUri)."""
    spec = _spec_of(body)
    status = dict(body.get("status") or {})
    model_uri = status.get("modelUri")
    if not isinstance(model_uri, str) or not model_uri:
        raise NotExported("its status has no modelUri (it exported no model)")
    if not spec.is_adapter:
        return ExportedModel(model_uri)
    if spec.output.merge_adapter:
        return ExportedModel(model_uri.rstrip("/") + "/" + MERGED_FOLDER)
    if spec.model.uri is not None:
        return ExportedModel(model_uri, base_model_uri=spec.model.uri, adapters=(model_uri,))
    # The job itself started from a parent: its adapter sits on that parent's (merged) model.
    lineage = status.get("lineage")
    if not isinstance(lineage, dict):
        raise NotExported("it started from model.fromJob but its status has no lineage")
    recorded = Lineage.model_validate(lineage)
    if recorded.base_model_uri:
        return ExportedModel(model_uri, base_model_uri=recorded.base_model_uri, adapters=(*(recorded.adapters or ()), model_uri))
    return ExportedModel(model_uri, base_model_uri=recorded.parent_model_uri, adapters=(model_uri,))


@dataclass(frozen=True)
class Reference(Generic[T]):
    """What a job does about a FineTuneJob it names (``model.fromJob``, ``distillation.teacher.fromJob``):
    ``value`` set -> start with it (the parent's :class:`~finetune_api.documents.Lineage`, the teacher's uri);
    ``wait`` -> stay Pending; else fail with ``reason``/``message``."""

    value: T | None = None
    wait: bool = False
    reason: str | None = None
    message: str | None = None


def _refused(message: str) -> Reference[Any]:
    return Reference(reason=PARENT_JOB_FAILED.reason, message=message)


def resolve_reference(
    name: str, namespace: str, spec: FineTuneJobSpec, field: str, ref_name: str, job: Mapping[str, Any] | None, *,
    failed: str, waiting: str, build: Callable[[Mapping[str, Any], ExportedModel, FineTuneJobSpec], T],
    refuse: Callable[[ExportedModel], str | None] = lambda exported: None,
) -> Reference[T]:
    """Job ``name``'s decision about the FineTuneJob ``ref_name`` that its ``field`` names, given that job's object
    (None: not found). ``failed`` says what a Failed one cannot be, ``waiting`` what its model is for; ``refuse``
    may reject what it exported (before the compatibility check), and ``build`` makes the value to start with."""
    where = f"{field} {ref_name!r}"
    if ref_name == name:
        return _refused(f"{where} names this job itself: name another FineTuneJob")
    if job is None:  # not yet: a folder applied at once creates the child first as often as not
        return Reference(
            wait=True, reason=PARENT_JOB_NOT_FOUND.reason,
            message=f"{where}: no FineTuneJob {ref_name} in namespace {namespace} yet (fromJob reads this namespace only); "
                    f"this job waits for it: create it, or fix the name and re-create this FineTuneJob")
    status = dict(job.get("status") or {})
    phase = status.get("phase")
    if phase == Phase.failed.value:
        return _refused(f"{where} Failed ({status.get('reason')}: {status.get('message') or ''}): {failed}; "
                        f"re-run it or name another, then re-create this FineTuneJob")
    if phase != Phase.succeeded.value:
        return Reference(
            wait=True, reason=WAITING_FOR_PARENT_JOB.reason,
            message=f"waiting for FineTuneJob {ref_name} to succeed (it is {phase or 'Pending'}): {waiting}")
    try:
        exported = exported_model(job)
        job_spec = _spec_of(job)
    except NotExported as why:
        return _refused(f"{where} Succeeded but {why}; name another FineTuneJob")
    refusal = refuse(exported)
    if refusal:
        return _refused(f"{where} {refusal}")
    problem = _incompatible(spec, job_spec)
    if problem:
        return _refused(f"{where}: {problem}")
    return Reference(value=build(job, exported, job_spec))


def resolve_parent(name: str, namespace: str, spec: FineTuneJobSpec, parent: Mapping[str, Any] | None) -> Reference[Lineage]:
    """The child ``name``'s decision about ``spec.model.fromJob``, given the parent object (None: not found)."""
    assert spec.model.from_job is not None
    parent_name = spec.model.from_job.name

    def lineage(body: Mapping[str, Any], exported: ExportedModel, parent_spec: FineTuneJobSpec) -> Lineage:
        status = dict(body.get("status") or {})
        data = status.get("data")
        data = data if isinstance(data, dict) else {}
        meta = body.get("metadata") or {}
        return Lineage(
            parent_job=parent_name,
            parent_uid=meta.get("uid"),
            parent_model_uri=exported.model_uri,
            base_model_uri=exported.base_model_uri,
            adapters=list(exported.adapters) or None,
            parent_output_uri=parent_spec.output.uri,
            parent_data_report_digest=data.get("reportDigest"),
            parent_test_set_uri=status.get("testSetUri"),
        )

    return resolve_reference(name, namespace, spec, "spec.model.fromJob", parent_name, parent,
                             failed="a job can only start from a Succeeded one", waiting="this job starts from its model",
                             build=lineage)


def _adapter_only(exported: ExportedModel) -> str | None:
    if not exported.is_adapter:
        return None
    return (f"exported only an adapter ({exported.model_uri}): a teacher needs whole weights; re-run it with "
            f"output.mergeAdapter true (its model/merged is then the teacher), or set distillation.teacher.uri")


def resolve_teacher(name: str, namespace: str, spec: FineTuneJobSpec, teacher: Mapping[str, Any] | None) -> Reference[str]:
    """The student ``name``'s decision about ``spec.distillation.teacher.fromJob``, given that job's object (None:
    not found). The teacher must be a whole model (a full fine-tune, or an adapter job with output.mergeAdapter):
    the trainer loads it as it is and merges nothing."""
    assert spec.distillation is not None and spec.distillation.teacher.from_job is not None
    return resolve_reference(name, namespace, spec, "spec.distillation.teacher.fromJob", spec.distillation.teacher.from_job.name,
                             teacher, failed="a teacher must come from a Succeeded job", waiting="its model is this job's teacher",
                             refuse=_adapter_only, build=lambda body, exported, teacher_spec: exported.model_uri)


def with_teacher_uri(spec: FineTuneJobSpec, teacher_uri: str | None) -> FineTuneJobSpec:
    """``spec`` as the trainer gets it: ``distillation.teacher.fromJob`` replaced by the model it resolved to
    (status.teacherUri), so the trainer reads one kind of teacher. Unchanged without a fromJob teacher."""
    distillation = spec.distillation
    if distillation is None or distillation.teacher.from_job is None or not teacher_uri:
        return spec
    teacher = distillation.teacher.model_copy(update={"uri": teacher_uri, "from_job": None})
    return spec.model_copy(update={"distillation": distillation.model_copy(update={"teacher": teacher})})


def _incompatible(child: FineTuneJobSpec, parent: FineTuneJobSpec) -> str | None:
    """Why ``child`` cannot start from ``parent``'s model, or None."""
    if child.model.task != parent.model.task:
        return f"it trained task {parent.model.task}, this job's model.task is {child.model.task}: they must match"
    out, theirs = as_prefix(child.output.uri), as_prefix(parent.output.uri)
    if out.startswith(theirs) or theirs.startswith(out):
        return (f"output.uri {child.output.uri} overlaps the parent's output {parent.output.uri}, where its model is: "
                f"the trainer deletes and overwrites under its output, so pick another output.uri")
    return None


def lineage_env(lineage: Lineage) -> list[dict[str, str]]:
    """The training pods' environment for ``lineage`` (finetune_api.env.LINEAGE), unset values left out."""
    values = {
        pod_env.PARENT_JOB: lineage.parent_job,
        pod_env.PARENT_MODEL_URI: lineage.parent_model_uri,
        pod_env.PARENT_BASE_MODEL_URI: lineage.base_model_uri,
        pod_env.PARENT_ADAPTERS: json.dumps(lineage.adapters) if lineage.adapters else None,
        pod_env.PARENT_OUTPUT_URI: lineage.parent_output_uri,
        pod_env.PARENT_DATA_REPORT_DIGEST: lineage.parent_data_report_digest,
        pod_env.PARENT_TEST_SET_URI: lineage.parent_test_set_uri,
    }
    return [{"name": name, "value": value} for name, value in values.items() if value]


def regression_event(old_status: Mapping[str, Any], new_status: Mapping[str, Any]) -> tuple[str, str, str] | None:
    """A Warning Event the first time status shows a failed regression gate (status.regression.passed false)."""
    new, old = new_status.get("regression"), old_status.get("regression")
    if not isinstance(new, dict) or new.get("passed") is not False or (isinstance(old, dict) and old.get("passed") is False):
        return None
    return ("Warning", "RegressionDetected",
            f"on the parent's test set {new.get('metric')} went from {new.get('parent')} (parent) to {new.get('child')} "
            f"(drop {new.get('drop')}, evaluation.regression.maxDrop {new.get('maxDrop')}, action {new.get('action')})")
