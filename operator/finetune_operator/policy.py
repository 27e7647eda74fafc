"""The chart's restrictions on what a FineTuneJob may ask for, as pure checks.

Everything a tenant writes in a FineTuneJob is hostile. Four restrictions, each off when its chart
value is empty (see charts/finetune-operator/README.md and SECURITY.md):

- ``namespaceSelector`` (:func:`namespace_refusal`): the operator serves only namespaces carrying
  these labels. Elsewhere it creates nothing and reads no Secret; the job waits Pending.
- ``storage.credentialsSecretLabels`` (:func:`secret_refusal`): the operator reads only Secrets
  carrying these labels. It looks at the Secret's metadata first and never reads the values of one
  without them; the job fails ``SecretNotLabelled``.
- ``trainer.allowedImages`` (:func:`image_allowed`): prefixes or globs of the images a job may name
  in ``spec.resources.image``; the job fails ``ImageNotAllowed``. The operator's configured default
  trainer image is always allowed.
- ``trainer.allowedPriorityClasses``: the PriorityClasses a job may name; it fails
  ``PriorityClassNotAllowed``.

The handler gathers the labels; these functions only compare, and the state machine
(``finetune_operator.state``) turns a refusal into the job's status before any child is created.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from fnmatch import fnmatchcase

from finetune_api.failures import IMAGE_NOT_ALLOWED, PRIORITY_CLASS_NOT_ALLOWED, SECRET_NOT_LABELLED
from finetune_api.spec import FineTuneJobSpec

Selector = tuple[tuple[str, str], ...]  # matchLabels as sorted (key, value) pairs; empty selects everything

_GLOB = frozenset("*?[")
# Where an image reference may continue after a prefix entry that does not end in one of them:
# a path component, a tag or a digest. So `registry.example.com/team` covers `.../team/trainer:1` and
# `.../team:1`, never `.../team-evil/trainer`.
_IMAGE_SEPARATORS = "/:@"


def matches(labels: Mapping[str, str] | None, selector: Selector) -> bool:
    """Whether ``labels`` carry every (key, value) of ``selector`` (a matchLabels); empty selects all."""
    have = labels or {}
    return all(have.get(key) == value for key, value in selector)


def selector_text(selector: Selector) -> str:
    return ",".join(f"{key}={value}" for key, value in selector)


def check_image_patterns(patterns: Sequence[str]) -> None:
    """Refuse (ValueError) an entry that would allow more than it seems to: an empty one, or one with
    whitespace. Called once at startup, like the endpoint allow-list."""
    for entry in patterns:
        if not entry or entry != entry.strip() or any(c.isspace() for c in entry):
            raise ValueError(f"{entry!r} is not an image prefix or glob")


def image_allowed(image: str, allowed: Sequence[str]) -> bool:
    """Whether ``image`` (as written in the spec) is covered by ``allowed``: empty allows any image.

    An entry with ``*``, ``?`` or ``[`` is a glob matched against the whole reference (``*`` also
    crosses ``/``). Any other entry is a prefix that ends at a component boundary: the image equals it,
    or continues after it with ``/``, ``:`` or ``@`` (or the entry itself ends with one of them).
    Matching is on the string as written: ``python:3`` is not ``docker.io/library/python:3``."""
    if not allowed:
        return True
    for entry in allowed:
        if _GLOB & set(entry):
            if fnmatchcase(image, entry):
                return True
        elif image == entry or (image.startswith(entry) and (entry[-1] in _IMAGE_SEPARATORS or image[len(entry)] in _IMAGE_SEPARATORS)):
            return True
    return False


def pod_spec_refusal(spec: FineTuneJobSpec, *, default_image: str, allowed_images: Sequence[str],
                     allowed_priority_classes: Sequence[str]) -> tuple[str, str] | None:
    """(reason, message) when the image or PriorityClass the job asks for is not allowed, else None."""
    res = spec.resources
    if res.image and res.image != default_image and not image_allowed(res.image, allowed_images):
        return (IMAGE_NOT_ALLOWED.reason,
                f"spec.resources.image {res.image!r} is not allowed on this cluster: the operator runs only images "
                f"matching {', '.join(allowed_images)} (chart value trainer.allowedImages), or its default "
                f"{default_image!r} when spec.resources.image is unset; fix the spec and re-create the FineTuneJob")
    if res.priority_class_name and allowed_priority_classes and res.priority_class_name not in allowed_priority_classes:
        return (PRIORITY_CLASS_NOT_ALLOWED.reason,
                f"spec.resources.priorityClassName {res.priority_class_name!r} is not allowed on this cluster: use one of "
                f"{', '.join(allowed_priority_classes)} (chart value trainer.allowedPriorityClasses) or none; fix the "
                f"spec and re-create the FineTuneJob")
    return None


def secret_refusal(namespace: str, name: str, labels: Mapping[str, str] | None, selector: Selector,
                   field: str = "storage.credentialsSecret") -> tuple[str, str] | None:
    """(reason, message) when the credentials Secret (``field``) lacks the labels the operator requires."""
    if matches(labels, selector):
        return None
    wanted = selector_text(selector)
    return (SECRET_NOT_LABELLED.reason,
            f"{field} {name!r} in namespace {namespace} lacks the label(s) {wanted} the operator requires "
            f"before it reads a Secret (chart value storage.credentialsSecretLabels); its values were not read. Label it "
            f"(kubectl -n {namespace} label secret {name} {wanted.replace(',', ' ')}), then re-create this FineTuneJob")


def namespace_refusal(namespace: str, labels: Mapping[str, str] | None, selector: Selector) -> str | None:
    """Why the operator does not serve ``namespace`` (its labels lack the selector's), else None."""
    if matches(labels, selector):
        return None
    wanted = selector_text(selector)
    return (f"namespace {namespace} lacks the label(s) {wanted}: the operator serves only namespaces that opt in "
            f"(chart value namespaceSelector) and creates nothing here until then (a cluster admin runs "
            f"kubectl label namespace {namespace} {wanted.replace(',', ' ')})")
