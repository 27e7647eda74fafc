"""Training progress from the trainer into the FineTuneJob status.

Mechanism: rank 0 of the trainer writes ``<output>/progress.json`` (a
:class:`finetune_api.documents.ProgressDocument`); the operator reads it while the job is active and once
more when it finishes, and projects it into ``status.progress`` and friends.

Cost per job is bounded: at most one small GET per ``interval`` seconds (default 15) per active job,
conditional on the ETag so an unchanged document costs a 304, with a short timeout, on a pool of 4
threads shared by all jobs (so it never slows reconciles down); nothing is read for finished jobs
after their final read. Credentials come from the job's ``storage.credentialsSecret``
and live only in memory, never in logs or status.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from finetune_api.s3 import is_s3, s3_client, split_s3
from finetune_api.spec import FineTuneJobSpec
from finetune_api.documents import PROGRESS_FILE, ProgressDocument, output_file

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
    return out


@dataclass
class _Entry:
    fetched_at: float = float("-inf")
    etag: str | None = None
    doc: ProgressDocument | None = None
    inflight: bool = False


Credentials = Callable[[str, str], "dict[str, str] | None"]  # (namespace, secret) -> AWS_* values


class ProgressReader:
    """Reads progress documents with per-job throttling and ETag caching.

    A reconcile never waits on the object store: ``read`` returns the cached document at once and, when
    it is older than ``interval``, refreshes it on a small background pool; the next reconcile (timer or
    event) publishes the new value. Only ``force=True`` (the final read when a job finishes) is synchronous.
    """

    def __init__(self, credentials: Credentials, interval: float = 15.0, timeout: float = 3.0, workers: int = 4):
        self.credentials = credentials
        self.interval = interval
        self.timeout = timeout
        self._entries: dict[str, _Entry] = {}
        self._clients: dict[tuple, Any] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="progress")
        self._pending: set[Future] = set()

    def forget(self, uid: str) -> None:
        with self._lock:
            self._entries.pop(uid, None)

    def flush(self, timeout: float = 30.0) -> None:
        """Wait for in-flight refreshes (tests)."""
        with self._lock:
            pending = list(self._pending)
        wait(pending, timeout=timeout)

    def read(self, uid: str, namespace: str, spec: FineTuneJobSpec, *, force: bool = False) -> ProgressDocument | None:
        with self._lock:
            entry = self._entries.setdefault(uid, _Entry())
            due = time.monotonic() - entry.fetched_at >= self.interval
            start = (force or due) and not entry.inflight
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
        try:
            raw, etag = self._get(namespace, spec, entry.etag)
            if raw is not None:
                entry.doc = ProgressDocument.model_validate(json.loads(raw))
                entry.etag = etag
        except ValueError as exc:
            log.warning("ignoring malformed progress document %s: %s", progress_uri(spec), exc)
        except Exception as exc:  # progress is best-effort: never fail a reconcile over it
            log.info("progress %s not readable yet: %s", progress_uri(spec), type(exc).__name__)
        finally:
            entry.inflight = False

    def _client(self, spec: FineTuneJobSpec, creds: dict[str, str]) -> Any:
        key = (spec.storage.endpoint, spec.storage.region, creds.get("AWS_ACCESS_KEY_ID"), creds.get("AWS_SECRET_ACCESS_KEY"))
        with self._lock:
            client = self._clients.get(key)
        if client is None:
            # One attempt with a short timeout: the next timer tick is the retry.
            client = s3_client(
                endpoint_url=spec.storage.endpoint,
                region=spec.storage.region or "us-east-1",
                connect_timeout=self.timeout,
                read_timeout=self.timeout,
                max_attempts=1,
                credentials=creds,
            )
            with self._lock:
                if len(self._clients) > 64:  # credentials rotate; keep the cache bounded
                    self._clients.clear()
                self._clients[key] = client
        return client

    def _get(self, namespace: str, spec: FineTuneJobSpec, etag: str | None) -> tuple[bytes | None, str | None]:
        uri = progress_uri(spec)
        if not is_s3(uri):
            path = Path(uri)
            return (path.read_bytes(), None) if path.exists() else (None, None)
        from botocore.exceptions import ClientError

        creds: dict[str, str] = {}
        if spec.storage.credentials_secret:
            creds = self.credentials(namespace, spec.storage.credentials_secret.name) or {}
        client = self._client(spec, creds)
        bucket, key = split_s3(uri)
        kwargs: dict[str, Any] = {"Bucket": bucket, "Key": key}
        if etag:
            kwargs["IfNoneMatch"] = etag
        try:
            obj = client.get_object(**kwargs)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code"))
            if code in ("304", "NotModified"):
                return None, etag
            if code in ("NoSuchKey", "404"):
                return None, None
            raise
        return obj["Body"].read(), obj.get("ETag")


def secret_values(read_secret: Callable[[str, str], Any]) -> Credentials:
    """Adapt a :func:`finetune_operator.kube.read_secret`-like ``(namespace, name)`` call to the AWS_* values the reader needs."""

    def get(namespace: str, name: str) -> dict[str, str] | None:
        secret = read_secret(namespace, name)
        if secret is None:
            return None
        data = secret.data or {}
        return {k: base64.b64decode(v).decode() for k, v in data.items() if k.startswith("AWS_")}

    return get
