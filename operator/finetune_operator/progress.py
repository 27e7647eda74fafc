"""Training progress from the trainer into the FineTuneJob status.

Mechanism: rank 0 of the trainer writes ``<output>/progress.json`` (a
:class:`finetune_api.documents.ProgressDocument`); the operator reads it while the job is active and once
more when it finishes, and projects it into ``status.progress`` and friends.

Cost per job is bounded: at most one small GET per ``interval`` seconds (default 15) per active job,
conditional on the ETag so an unchanged document costs a 304, on a pool of 4 threads shared by all
jobs (so it never slows reconciles down); nothing is read for finished jobs after their final read.

The endpoint is the tenant's choice (``storage.endpoint``), so the far side is treated as hostile
(:mod:`finetune_operator.tenant_io`): one deadline for the whole read (5 s), a size cap (1 MiB), no
redirects, NaN/Infinity and out-of-range numbers refused, depth and string lengths capped, then the
schema. A stuck endpoint holds one worker for at most the deadline, and each job has at most one read
in flight. Endpoints outside the operator's allow-list (:func:`endpoint_allowed`) are never contacted.
Credentials come from the job's ``storage.credentialsSecret`` only, live only in memory, and sign a
URL the reader fetches itself; a job without that Secret is read anonymously, never with the
operator's own identity (its environment, IRSA, instance profile). Why a read failed is kept per job
(:meth:`ProgressReader.problem`), one line fit for a condition message.
"""

from __future__ import annotations

import base64
import logging
import ssl
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

from pydantic import ValidationError

from finetune_api.documents import PROGRESS_FILE, ProgressDocument, output_file
from finetune_api.s3 import is_s3, s3_client, split_s3
from finetune_api.spec import FineTuneJobSpec
from finetune_operator.config import OperatorConfig
from finetune_operator.tenant_io import Limits, TenantIOError, bounded_get, check_numbers, parse_object

log = logging.getLogger(__name__)

MAX_CHECKPOINTS_IN_STATUS = 5


def progress_uri(spec: FineTuneJobSpec) -> str:
    return output_file(spec.output.uri, PROGRESS_FILE)


def _fmt_eta(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f" eta {h}h{m:02d}m" if h else f" eta {m}m{s:02d}s"


def _r(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else float(f"{value:.{digits}g}")


def project(doc: ProgressDocument) -> dict[str, Any]:
    """The status fields a progress document sets (pure). Numbers are rounded to 4 significant digits:
    status is for people and `kubectl get`, the full values stay in progress.json."""
    percent = None
    if doc.total_steps:
        percent = round(100.0 * min(doc.step, doc.total_steps) / doc.total_steps, 1)
    text = f"{doc.step}/{doc.total_steps} ({percent}%)" if doc.total_steps else (doc.stage or None)
    progress = {
        "step": doc.step,
        "totalSteps": doc.total_steps,
        "percent": percent,
        "text": text,
        "epoch": round(doc.epoch, 3) if doc.epoch is not None else None,
        "etaSeconds": round(doc.eta_seconds, 1) if doc.eta_seconds is not None else None,
        "trainLoss": _r(doc.train_loss),
        "evalLoss": _r(doc.eval_loss),
        "learningRate": _r(doc.learning_rate),
        "bestMetric": _r(doc.best_metric),
        "bestMetricName": doc.best_metric_name,
        "stage": doc.stage,
        "fold": doc.fold,
        "updatedAt": doc.updated_at,
    }
    out: dict[str, Any] = {"progress": {k: v for k, v in progress.items() if v is not None}}
    if doc.latest_checkpoint:
        out["latestCheckpoint"] = doc.latest_checkpoint
    if doc.checkpoints:
        out["checkpoints"] = [c.wire() for c in doc.checkpoints[-MAX_CHECKPOINTS_IN_STATUS:]]
    if doc.model_uri:
        out["modelUri"] = doc.model_uri
    if doc.data:
        out["data"] = doc.data.wire()
    if doc.gain:
        gain = doc.gain.wire()
        out["gain"] = {k: _r(v) if isinstance(v, float) else v for k, v in gain.items()}
    if doc.tracking:
        out["tracking"] = doc.tracking.wire()
    if doc.test_set_uri:
        out["testSetUri"] = doc.test_set_uri
    if doc.regression:
        out["regression"] = doc.regression.wire()  # full precision: the gate's numbers are compared by people and tests
    if doc.cross_validation:
        out["crossValidation"] = doc.cross_validation.wire()  # full precision, like regression: mean/std are checked against the folds
    return out


# ------------------------------------------------------------------------------------- endpoints

AWS = "aws"
"""The allow-list entry that stands for AWS S3 itself (a job with no ``storage.endpoint``)."""

_DEFAULT_PORTS = {"http": 80, "https": 443}


def _origin(url: str) -> tuple[str, str, int]:
    """``(scheme, host, port)`` of an ``http(s)://host[:port]`` URL; ValueError for anything else."""
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        raise ValueError(f"{url!r} is not an http:// or https:// endpoint")
    return scheme, parts.hostname.lower(), parts.port or _DEFAULT_PORTS[scheme]


def check_allowlist(allowlist: Sequence[str]) -> None:
    """Raise ValueError for the first entry that is neither ``aws`` nor ``scheme://host[:port]`` (the
    host may start with ``*.``); run once at startup, so a typo stops the operator instead of
    refusing every job."""
    for entry in allowlist:
        text = entry.strip()
        if text.lower() == AWS:
            continue
        _origin(text.replace("://*.", "://", 1))
        if urlsplit(text).path not in ("", "/") or urlsplit(text).query:
            raise ValueError(f"allowed endpoint {entry!r} has a path or query: give scheme://host[:port] only")


def endpoint_allowed(endpoint: str | None, allowlist: Sequence[str]) -> bool:
    """Whether the operator may contact ``endpoint`` (a job's ``storage.endpoint``; None is AWS S3).

    An empty allow-list allows every endpoint (the default: one tenant, or tenants you trust). An
    entry is ``aws`` or ``scheme://host[:port]``: scheme, host and port must all match (the port
    defaults to the scheme's), and a host ``*.example.com`` matches every name under example.com but
    not example.com itself. Pure, so the decider can use it too."""
    if not allowlist:
        return True
    entries = [e.strip() for e in allowlist]
    if endpoint is None:
        return any(e.lower() == AWS for e in entries)
    try:
        scheme, host, port = _origin(endpoint)
    except ValueError:
        return False
    for entry in entries:
        if entry.lower() == AWS:
            continue
        wildcard = "://*." in entry
        try:
            e_scheme, e_host, e_port = _origin(entry.replace("://*.", "://", 1))
        except ValueError:
            continue
        host_ok = host.endswith("." + e_host) if wildcard else host == e_host
        if host_ok and (scheme, port) == (e_scheme, e_port):
            return True
    return False


def endpoint_refusal(endpoint: str | None, allowlist: Sequence[str]) -> str:
    """The message for a job whose endpoint :func:`endpoint_allowed` refuses."""
    named = endpoint or "AWS S3 (no storage.endpoint)"
    return (f"storage.endpoint {named} is not one of the operator's allowed storage endpoints ({', '.join(allowlist)}): "
            "use one of those, or ask the cluster admin to add it to the chart value storage.allowedEndpoints")


def tracking_refusal(uri: str, allowlist: Sequence[str]) -> str:
    """The message for a job whose ``tracking.mlflow.uri`` :func:`endpoint_allowed` refuses: the trainer
    sends the job's MLflow credentials there, so it is held to the same list as the storage endpoint."""
    return (f"tracking.mlflow.uri {uri} is not one of the operator's allowed endpoints ({', '.join(allowlist)}): "
            "use one of those, or ask the cluster admin to add its scheme://host[:port] to the chart value storage.allowedEndpoints")


# ----------------------------------------------------------------------------------------- reader


@dataclass
class _Entry:
    fetched_at: float = float("-inf")
    etag: str | None = None
    doc: ProgressDocument | None = None
    inflight: bool = False
    problem: str | None = None  # why the last read failed, one line; None after a good read


Credentials = Callable[[str, str], "dict[str, str] | None"]  # (namespace, secret) -> AWS_* values


class ProgressReader:
    """Reads progress documents with per-job throttling and ETag caching.

    A reconcile never waits on the object store: ``read`` returns the cached document at once and, when
    it is older than ``interval``, refreshes it on a small background pool; the next reconcile (timer or
    event) publishes the new value. Only ``force=True`` (the final read when a job finishes) is
    synchronous: it first waits out a background refresh already in flight (that one may have started
    before the trainer's last write), then reads itself, each within ``limits.deadline``.
    """

    def __init__(self, credentials: Credentials, interval: float = 15.0, timeout: float = 3.0, workers: int = 4, *,
                 limits: Limits | None = None, allowed_endpoints: Sequence[str] = (), local_paths: bool = True,
                 ca_bundle: str | None = None):
        self.credentials = credentials
        self.interval = interval
        self.timeout = timeout
        self.limits = limits or Limits()
        self.allowed_endpoints = tuple(allowed_endpoints)
        self.local_paths = local_paths  # the operator's own filesystem: tests only (from_config turns it off)
        self.tls = ssl.create_default_context(cafile=ca_bundle)  # the system CAs, or (like botocore) only the bundle given
        self._entries: dict[str, _Entry] = {}
        self._clients: dict[tuple, Any] = {}
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)  # notified whenever a refresh ends
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="progress")
        self._pending: set[Future] = set()

    @classmethod
    def from_config(cls, config: OperatorConfig, credentials: Credentials) -> ProgressReader:
        """The operator's reader: the chart's limits and allow-list, and no reads of local paths (in a
        cluster the operator's filesystem is its own, never a job's output)."""
        limits = Limits(deadline=config.progress_deadline_seconds, max_bytes=config.progress_max_bytes)
        return cls(credentials, interval=config.progress_interval, timeout=min(3.0, limits.deadline), limits=limits,
                   allowed_endpoints=config.allowed_endpoints, local_paths=config.progress_local_paths, ca_bundle=config.ca_bundle)

    def forget(self, uid: str) -> None:
        with self._lock:
            self._entries.pop(uid, None)

    def flush(self, timeout: float = 30.0) -> None:
        """Wait for in-flight refreshes (tests)."""
        with self._lock:
            pending = list(self._pending)
        wait(pending, timeout=timeout)

    def problem(self, uid: str) -> str | None:
        """Why the last read of this job's progress failed (one line, for a condition), or None."""
        with self._lock:
            entry = self._entries.get(uid)
        return entry.problem if entry is not None else None

    def read(self, uid: str, namespace: str, spec: FineTuneJobSpec, *, force: bool = False) -> ProgressDocument | None:
        with self._lock:
            entry = self._entries.setdefault(uid, _Entry())
            if force:  # the last word: never the answer of a read that began before it
                self._idle.wait_for(lambda: not entry.inflight, timeout=self.limits.deadline + self.timeout)
            due = time.monotonic() - entry.fetched_at >= self.interval
            start = force or (due and not entry.inflight)
            if start:
                entry.inflight = True
                entry.fetched_at = time.monotonic()
        if start and force:
            self._refresh(entry, namespace, spec)
        elif start:
            future = self._pool.submit(self._refresh, entry, namespace, spec)
            with self._lock:
                self._pending.add(future)
            future.add_done_callback(lambda f: self._discard(f))
        return entry.doc

    def _discard(self, future: Future) -> None:
        with self._lock:
            self._pending.discard(future)

    def _refresh(self, entry: _Entry, namespace: str, spec: FineTuneJobSpec) -> None:
        uri = progress_uri(spec)
        try:
            raw, etag = self._get(namespace, spec, entry.etag)
            if raw is not None:
                entry.doc = _document(raw, self.limits)
                entry.etag = etag
            entry.problem = None
        except TenantIOError as exc:
            self._note(entry, f"progress {uri}: {exc}")
        except Exception as exc:  # progress is best-effort: never fail a reconcile over it
            self._note(entry, f"progress {uri} not readable ({type(exc).__name__})", level=logging.INFO)
        finally:
            with self._lock:
                entry.inflight = False
                self._idle.notify_all()

    def _note(self, entry: _Entry, problem: str, level: int = logging.WARNING) -> None:
        """Keep the problem for status; log it once per change, not on every tick."""
        if problem != entry.problem:
            log.log(level, "%s", problem)
        entry.problem = problem

    def _client(self, spec: FineTuneJobSpec, creds: dict[str, str]) -> Any:
        key = (spec.storage.endpoint, spec.storage.region, creds.get("AWS_ACCESS_KEY_ID"), creds.get("AWS_SECRET_ACCESS_KEY"),
               creds.get("AWS_SESSION_TOKEN"))
        with self._lock:
            client = self._clients.get(key)
        if client is None:
            # Used to sign a URL only (the GET itself is tenant_io's); never the operator's own identity.
            client = s3_client(
                endpoint_url=spec.storage.endpoint,
                region=spec.storage.region or "us-east-1",
                connect_timeout=self.timeout,
                read_timeout=self.timeout,
                max_attempts=1,
                credentials=creds,
                ambient_credentials=False,
                signature_version="s3v4",
            )
            with self._lock:
                if len(self._clients) > 64:  # credentials rotate; keep the cache bounded
                    self._clients.clear()
                self._clients[key] = client
        return client

    def _get(self, namespace: str, spec: FineTuneJobSpec, etag: str | None) -> tuple[bytes | None, str | None]:
        uri = progress_uri(spec)
        if not is_s3(uri):
            return self._get_local(Path(uri)), None
        if not endpoint_allowed(spec.storage.endpoint, self.allowed_endpoints):
            raise TenantIOError(endpoint_refusal(spec.storage.endpoint, self.allowed_endpoints))
        creds: dict[str, str] = {}
        if spec.storage.credentials_secret:
            creds = self.credentials(namespace, spec.storage.credentials_secret.name) or {}
        bucket, key = split_s3(uri)
        url = self._client(spec, creds).generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=300)
        resp = bounded_get(url, {"If-None-Match": etag} if etag else {}, self.limits, self.tls)
        if resp.status == 200:
            return resp.body, resp.headers.get("etag")
        if resp.status == 304:
            return None, etag
        if resp.status == 404:
            return None, None
        raise TenantIOError(_http_problem(resp.status))

    def _get_local(self, path: Path) -> bytes | None:
        if not self.local_paths:
            raise TenantIOError("the operator reads progress from s3:// outputs only (its own filesystem is not a job's)")
        if not path.is_file():  # a FIFO or a device would block or never end
            return None
        with path.open("rb") as f:
            raw = f.read(self.limits.max_bytes + 1)
        if len(raw) > self.limits.max_bytes:
            raise TenantIOError(f"the document is over the {self.limits.max_bytes}-byte cap")
        return raw


def _http_problem(status: int) -> str:
    if status in (401, 403):
        return f"the endpoint refused access (HTTP {status}): check storage.credentialsSecret and the bucket policy"
    if 300 <= status < 400:
        return f"the endpoint answered a redirect (HTTP {status}), which the operator does not follow"
    return f"the endpoint answered HTTP {status}"


def _document(raw: bytes, limits: Limits) -> ProgressDocument:
    """A progress document from untrusted bytes: bounded JSON (:func:`parse_object`), then the schema.
    A schema error names the fields, never the values received."""
    value = parse_object(raw, limits)
    try:
        doc = ProgressDocument.model_validate(value)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        first = errors[0]
        where = ".".join(str(part) for part in first["loc"]) or "$"
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise TenantIOError(f"the document does not match the progress schema: {where}: {first['msg']}{more}") from None
    check_numbers(doc.model_dump())  # the schema turns "NaN" and "1e999" strings into floats: none may reach status
    return doc


def secret_values(read_secret: Callable[[str, str], Any]) -> Credentials:
    """Adapt a :func:`finetune_operator.kube.read_secret`-like ``(namespace, name)`` call to the AWS_* values the reader needs."""

    def get(namespace: str, name: str) -> dict[str, str] | None:
        secret = read_secret(namespace, name)
        if secret is None:
            return None
        data = secret.data or {}
        return {k: base64.b64decode(v).decode() for k, v in data.items() if k.startswith("AWS_")}

    return get
