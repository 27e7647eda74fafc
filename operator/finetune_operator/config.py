"""Operator settings, read once from the environment (set by the Helm chart).

This is the only module of the operator that reads its own environment: everything else gets an
:class:`OperatorConfig` (or the :class:`OperatorDefaults` in it) as an argument, so a test builds one
directly and no setting changes under a running operator.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

# Training pods' metrics (the operator's own port is OperatorConfig.metrics_port): the trainer serves
# Prometheus metrics on every rank, local rank i of a pod on METRICS_PORT + i. The trainer's default too.
METRICS_PORT = 9400


@dataclass(frozen=True)
class OperatorDefaults:
    """Operator-wide settings of the training pods that the spec does not carry."""

    trainer_image: str = "ghcr.io/finetune-operator/trainer:0.1.0"
    image_pull_policy: str = "IfNotPresent"
    termination_grace_seconds: int = 300
    metrics_port: int = METRICS_PORT
    # Give each job a NetworkPolicy (finetune_operator.networkpolicy): only its own pods reach its
    # rendezvous and collective ports; the metrics ports are open to the namespaces selected below.
    network_policy: bool = True
    # matchLabels of the namespaces whose pods may scrape the training pods' metrics; empty: all.
    metrics_from_namespaces: tuple[tuple[str, str], ...] = ()


def _int(environ: Mapping[str, str], name: str, default: int) -> int:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise SystemExit(f"environment variable {name} must be an integer, got {raw!r}") from exc


def _bool(environ: Mapping[str, str], name: str, default: bool) -> bool:
    raw = environ.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise SystemExit(f"environment variable {name} must be true or false, got {raw!r}")


def _labels(environ: Mapping[str, str], name: str) -> tuple[tuple[str, str], ...]:
    """``key=value,key=value`` (a label selector's matchLabels) as sorted pairs."""
    pairs = []
    for item in (part.strip() for part in environ.get(name, "").split(",")):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"environment variable {name} must be key=value pairs separated by commas, got {item!r}")
        pairs.append((key.strip(), value.strip()))
    return tuple(sorted(pairs))


def _list(environ: Mapping[str, str], name: str) -> tuple[str, ...]:
    """A comma-separated list, entries stripped, empty ones dropped."""
    return tuple(item.strip() for item in environ.get(name, "").split(",") if item.strip())


def _float(environ: Mapping[str, str], name: str, default: float) -> float:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError as exc:
        raise SystemExit(f"environment variable {name} must be a number, got {raw!r}") from exc


@dataclass(frozen=True)
class Timing:
    """The time limits the state machine applies (finetune_operator.state), operator-wide."""

    # A training pod whose container keeps waiting on an error (ImagePullBackOff, a missing Secret or
    # ConfigMap: CreateContainerConfigError, ...) this long after it was created fails the job.
    # Unschedulable pods only show the scheduler's message: waiting for GPUs is normal on a busy cluster.
    pod_start_timeout: float = 600.0
    # Restart n (1, 2, ...) of a group waits restart_backoff * 2**(n-1) seconds, at most
    # restart_backoff_max, so a short outage (S3 down for minutes) does not use up backoffLimit at once.
    restart_backoff: float = 20.0
    restart_backoff_max: float = 600.0


@dataclass(frozen=True)
class OperatorConfig:
    namespaces: tuple[str, ...] = ()  # empty = all namespaces
    metrics_port: int = 8080
    resync_seconds: int = 10
    log_level: str = "INFO"
    defaults: OperatorDefaults = field(default_factory=OperatorDefaults)
    progress_interval: float = 15.0  # seconds between two reads of a running job's progress document
    tracemalloc: bool = False  # log the top allocation sites on SIGUSR1 (memory investigations)
    instance: str = "finetune-operator"  # reportingInstance of the Events it posts: the pod's name
    timing: Timing = field(default_factory=Timing)
    # Reading progress.json from the endpoint a tenant names (see finetune_operator.tenant_io):
    progress_deadline_seconds: float = 5.0  # the whole read, connect to last byte
    progress_max_bytes: int = 1 << 20  # body size cap
    allowed_endpoints: tuple[str, ...] = ()  # storage endpoints the operator may contact; empty = any ("aws" = AWS S3)
    progress_local_paths: bool = False  # read local-path outputs from the operator's own filesystem (dev only)
    ca_bundle: str | None = None  # extra CA certificates for https storage endpoints (botocore's AWS_CA_BUNDLE)
    # Least privilege (finetune_operator.policy); each empty = no restriction.
    namespace_selector: tuple[tuple[str, str], ...] = ()  # matchLabels of the namespaces served
    secret_selector: tuple[tuple[str, str], ...] = ()  # matchLabels a credentials Secret must carry to be read
    allowed_images: tuple[str, ...] = ()  # prefixes or globs of spec.resources.image (the default image is always allowed)
    allowed_priority_classes: tuple[str, ...] = ()  # names spec.resources.priorityClassName may take

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> OperatorConfig:
        env = os.environ if environ is None else environ
        namespaces = tuple(n.strip() for n in env.get("FINETUNE_NAMESPACES", "").split(",") if n.strip())
        defaults = OperatorDefaults(
            trainer_image=env.get("FINETUNE_TRAINER_IMAGE", OperatorDefaults.trainer_image),
            image_pull_policy=env.get("FINETUNE_TRAINER_PULL_POLICY", OperatorDefaults.image_pull_policy),
            termination_grace_seconds=_int(env, "FINETUNE_TERMINATION_GRACE_SECONDS", OperatorDefaults.termination_grace_seconds),
            network_policy=_bool(env, "FINETUNE_NETWORK_POLICY", OperatorDefaults.network_policy),
            metrics_from_namespaces=_labels(env, "FINETUNE_METRICS_FROM_NAMESPACES"),
        )
        return cls(
            namespaces=namespaces,
            metrics_port=_int(env, "FINETUNE_METRICS_PORT", 8080),
            resync_seconds=max(1, _int(env, "FINETUNE_RESYNC_SECONDS", 10)),
            log_level=env.get("FINETUNE_LOG_LEVEL", "INFO").upper(),
            defaults=defaults,
            progress_interval=_float(env, "FINETUNE_PROGRESS_INTERVAL", 15.0),
            tracemalloc=env.get("FINETUNE_TRACEMALLOC") == "1",
            instance=env.get("HOSTNAME", "finetune-operator"),
            timing=Timing(
                pod_start_timeout=_float(env, "FINETUNE_POD_START_TIMEOUT_SECONDS", Timing.pod_start_timeout),
                restart_backoff=_float(env, "FINETUNE_RESTART_BACKOFF_SECONDS", Timing.restart_backoff),
                restart_backoff_max=_float(env, "FINETUNE_RESTART_BACKOFF_MAX_SECONDS", Timing.restart_backoff_max),
            ),
            progress_deadline_seconds=max(0.5, _float(env, "FINETUNE_PROGRESS_DEADLINE_SECONDS", 5.0)),
            progress_max_bytes=max(1024, _int(env, "FINETUNE_PROGRESS_MAX_BYTES", 1 << 20)),
            allowed_endpoints=_list(env, "FINETUNE_ALLOWED_ENDPOINTS"),
            progress_local_paths=env.get("FINETUNE_PROGRESS_LOCAL_PATHS") == "1",
            ca_bundle=env.get("AWS_CA_BUNDLE") or None,
            namespace_selector=_labels(env, "FINETUNE_NAMESPACE_SELECTOR"),
            secret_selector=_labels(env, "FINETUNE_CREDENTIALS_SECRET_LABELS"),
            allowed_images=_list(env, "FINETUNE_ALLOWED_IMAGES"),
            allowed_priority_classes=_list(env, "FINETUNE_ALLOWED_PRIORITY_CLASSES"),
        )
