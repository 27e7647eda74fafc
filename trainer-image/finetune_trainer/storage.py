"""One interface over S3-compatible object stores and local paths.

Every URI is either ``s3://bucket/key`` or a local path (absolute in specs; relative ones work too, for
laptop runs and tests). Prefixes have directory semantics: ``s3://b/data`` covers ``s3://b/data`` itself
and everything under ``s3://b/data/``, never ``s3://b/data2/...``.

Failures the user can fix become :mod:`finetune_trainer.errors` types here, with a message naming the
endpoint and what to check: rejected credentials -> ``S3AuthError``, an unreachable endpoint ->
``S3EndpointError``. A missing object or bucket is a plain :class:`FileNotFoundError`, because only the
caller knows whether that means ``DatasetNotFound``, ``ModelNotFound`` or "no checkpoint yet".
Secrets never appear in messages or logs.

Local writes are atomic (temp file + rename) so a reader never sees half a file; S3 puts are atomic
by nature.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

from finetune_api.s3 import S3_SCHEME, is_s3, s3_client, split_s3

from finetune_trainer.errors import S3AuthError, S3EndpointError

log = logging.getLogger(__name__)

# Error codes the S3 API (and MinIO) return when the credentials, or their permissions, are wrong.
_AUTH_CODES = frozenset(
    {
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "AccessDenied",
        "403",
        "Forbidden",
        "ExpiredToken",
        "InvalidToken",
        "TokenRefreshRequired",
        "InvalidClientTokenId",
        "AuthorizationHeaderMalformed",
        "AccountProblem",
    }
)
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NoSuchBucket", "404", "NotFound"})

# A wrong endpoint should fail in seconds: 5 s to connect, 3 attempts in all.
CONNECT_TIMEOUT_S = 5
READ_TIMEOUT_S = 60
MAX_ATTEMPTS = 3


def join(uri: str, *parts: str) -> str:
    """Join URI parts with single slashes: ``join("s3://b/a", "x")`` -> ``s3://b/a/x``; ``join("/d", "x")`` -> ``/d/x``."""
    out = uri
    for part in parts:
        part = str(part).strip("/")
        if not part:
            continue
        out = out if out.endswith("/") else out + "/"
        out += part
    return out


class Storage:
    """S3 or local file access with the errors mapped to trainer failure reasons.

    Credentials come from the standard AWS chain (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
    ``AWS_SESSION_TOKEN``, ...). The boto3 client is created on first S3 use, so local-only runs need
    neither boto3 credentials nor network. boto3 clients are thread-safe; one is shared by the workers.
    """

    def __init__(self, endpoint_url: str | None = None, region: str | None = None):
        self.endpoint_url = endpoint_url
        self.region = region
        self._client: Any = None
        self._client_lock = threading.Lock()

    @classmethod
    def from_spec(cls, storage: Any) -> "Storage":
        """From a :class:`finetune_api.spec.StorageSpec`."""
        return cls(endpoint_url=storage.endpoint, region=storage.region)

    # ------------------------------------------------------------------------------------ client

    @property
    def client(self) -> Any:
        with self._client_lock:
            if self._client is None:
                self._client = self._make_client()
        return self._client

    def _make_client(self) -> Any:
        return s3_client(
            endpoint_url=self.endpoint_url,
            region=self.region,
            connect_timeout=CONNECT_TIMEOUT_S,
            read_timeout=READ_TIMEOUT_S,
            max_attempts=MAX_ATTEMPTS,
            retry_mode="standard",
            max_pool_connections=32,  # the transfer workers share the client
        )

    @property
    def endpoint_name(self) -> str:
        """The endpoint for messages: the configured one, else the client's (AWS)."""
        if self.endpoint_url:
            return self.endpoint_url
        if self._client is not None:
            return str(self._client.meta.endpoint_url)
        return "AWS S3"

    @contextlib.contextmanager
    def _s3_errors(self, action: str, uri: str) -> Iterator[None]:
        """Translate botocore failures into errors a user can act on."""
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import (
            ClientError,
            ConnectionClosedError,
            ConnectTimeoutError,
            EndpointConnectionError,
            NoCredentialsError,
            PartialCredentialsError,
            ReadTimeoutError,
        )

        try:
            yield
        except ClientError as exc:
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in _NOT_FOUND_CODES or status == 404:
                raise FileNotFoundError(f"{uri} does not exist ({code or status} from {self.endpoint_name})") from None
            if code in _AUTH_CODES or status == 403:
                bucket = split_s3(uri)[0] if is_s3(uri) else uri
                raise S3AuthError(
                    f"the object store at {self.endpoint_name} rejected the request to {action} {uri} ({code or status}). "
                    f"Check that AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (the keys of storage.credentialsSecret) "
                    f"are valid for this endpoint, that storage.endpoint/storage.region are right, and that the "
                    f"credentials may {action} bucket {bucket}."
                ) from None
            if (isinstance(status, int) and status >= 500) or code in ("SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout"):
                # The store is there but failing or throttling after botocore's own retries: worth a group restart.
                raise S3EndpointError(
                    f"the object store at {self.endpoint_name} kept failing to {action} {uri} ({code or status}); "
                    f"it may be overloaded or unhealthy"
                ) from None
            raise
        except S3UploadFailedError as exc:  # upload_file wraps the ClientError into its message
            text = str(exc)
            if any(code in text for code in ("NoSuchBucket", "404")):
                raise FileNotFoundError(f"cannot write {uri}: the bucket does not exist at {self.endpoint_name}") from None
            if any(code in text for code in _AUTH_CODES):
                raise S3AuthError(
                    f"the object store at {self.endpoint_name} rejected the upload to {uri}. Check AWS_ACCESS_KEY_ID and "
                    f"AWS_SECRET_ACCESS_KEY (storage.credentialsSecret) and that they may write there."
                ) from None
            raise
        except (NoCredentialsError, PartialCredentialsError):
            raise S3AuthError(
                f"no S3 credentials found to {action} {uri} at {self.endpoint_name}: set AWS_ACCESS_KEY_ID and "
                f"AWS_SECRET_ACCESS_KEY (storage.credentialsSecret)."
            ) from None
        except (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError, ConnectionClosedError) as exc:
            raise S3EndpointError(
                f"could not reach the object store at {self.endpoint_name} to {action} {uri} "
                f"({type(exc).__name__}, {MAX_ATTEMPTS} attempts). Check storage.endpoint and that the pods can reach it."
            ) from None

    # ----------------------------------------------------------------------------------- queries

    def exists(self, uri: str) -> bool:
        """True when ``uri`` is an object/file, or a prefix/directory with at least one object under it."""
        if not is_s3(uri):
            path = Path(uri)
            return path.is_file() or (path.is_dir() and any(p.is_file() for p in path.rglob("*")))
        bucket, key = split_s3(uri)
        if key and not key.endswith("/"):
            try:
                with self._s3_errors("read", uri):
                    self.client.head_object(Bucket=bucket, Key=key)
                return True
            except FileNotFoundError:
                pass
        prefix = key.rstrip("/") + "/" if key else ""
        try:
            with self._s3_errors("list", uri):
                resp = self.client.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1)
        except FileNotFoundError:  # no such bucket
            return False
        return resp.get("KeyCount", 0) > 0

    def list(self, uri_prefix: str) -> list[str]:
        """Full URIs of the objects/files under ``uri_prefix`` (recursive, sorted); ``[uri]`` for a single object/file.

        Raises FileNotFoundError when the bucket does not exist; an empty list means nothing is there.
        """
        if not is_s3(uri_prefix):
            root = Path(uri_prefix)
            if root.is_file():
                return [str(root)]
            if not root.is_dir():
                return []
            return sorted(str(p) for p in root.rglob("*") if p.is_file())
        bucket, key = split_s3(uri_prefix)
        stem = key.rstrip("/")
        out: list[str] = []
        with self._s3_errors("list", uri_prefix):
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=bucket, Prefix=stem):
                for obj in page.get("Contents", []):
                    k = obj["Key"]
                    if k.endswith("/"):  # a "directory marker", not data
                        continue
                    if not stem or k == stem or k.startswith(stem + "/"):
                        out.append(f"{S3_SCHEME}{bucket}/{k}")
        return sorted(out)

    # ------------------------------------------------------------------------------ whole objects

    def read_bytes(self, uri: str) -> bytes:
        if not is_s3(uri):
            return Path(uri).read_bytes()
        bucket, key = split_s3(uri)
        with self._s3_errors("read", uri):
            return self.client.get_object(Bucket=bucket, Key=key)["Body"].read()

    def read_bytes_at_most(self, uri: str, limit: int) -> bytes:
        """At most ``limit + 1`` bytes of the object: a caller that gets more than ``limit`` knows it is too big,
        without the rest ever being read."""
        if not is_s3(uri):
            with open(uri, "rb") as f:
                return f.read(limit + 1)
        bucket, key = split_s3(uri)
        with self._s3_errors("read", uri):
            body = self.client.get_object(Bucket=bucket, Key=key)["Body"]
            try:
                return body.read(limit + 1)
            finally:
                body.close()

    def write_bytes(self, uri: str, data: bytes) -> None:
        if not is_s3(uri):
            _atomic_write(Path(uri), lambda tmp: tmp.write_bytes(data))
            return
        bucket, key = split_s3(uri)
        with self._s3_errors("write", uri):
            self.client.put_object(Bucket=bucket, Key=key, Body=data)

    def write_json(self, uri: str, obj: Any) -> None:
        self.write_bytes(uri, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())

    def read_json(self, uri: str) -> Any:
        return json.loads(self.read_bytes(uri))

    # --------------------------------------------------------------------------------- transfers

    def download(self, uri: str, local_path: Path) -> Path:
        """Copy one object/file to ``local_path`` (parents created, written atomically)."""
        local_path = Path(local_path)
        if not is_s3(uri):
            src = Path(uri)
            if not src.is_file():
                raise FileNotFoundError(f"{uri} does not exist")
            if src.resolve() != local_path.resolve():
                _atomic_write(local_path, lambda tmp: shutil.copyfile(src, tmp))
            return local_path
        bucket, key = split_s3(uri)
        with self._s3_errors("read", uri):
            _atomic_write(local_path, lambda tmp: self.client.download_file(bucket, key, str(tmp)))
        return local_path

    def download_prefix(self, uri_prefix: str, local_dir: Path, workers: int = 8) -> Path:
        """Copy everything under ``uri_prefix`` into ``local_dir``, keeping relative paths. Parallel."""
        local_dir = Path(local_dir)
        uris = self.list(uri_prefix)
        if not uris:
            raise FileNotFoundError(f"nothing under {uri_prefix}")
        base = uri_prefix.rstrip("/")

        def one(uri: str) -> Path:
            rel = uri[len(base) :].lstrip("/") or uri.rsplit("/", 1)[-1]
            return self.download(uri, local_dir / rel)

        _parallel(one, uris, workers)
        return local_dir

    def upload_file(self, local_path: Path, uri: str) -> None:
        local_path = Path(local_path)
        if not is_s3(uri):
            _atomic_write(Path(uri), lambda tmp: shutil.copyfile(local_path, tmp))
            return
        bucket, key = split_s3(uri)
        with self._s3_errors("write", uri):
            self.client.upload_file(str(local_path), bucket, key)

    def upload_dir(self, local_dir: Path, uri_prefix: str, workers: int = 8) -> list[str]:
        """Upload every file under ``local_dir`` to ``uri_prefix/<relative path>``; returns the URIs, sorted."""
        local_dir = Path(local_dir)
        files = sorted(p for p in local_dir.rglob("*") if p.is_file())
        pairs = [(p, join(uri_prefix, p.relative_to(local_dir).as_posix())) for p in files]
        _parallel(lambda pair: self.upload_file(*pair), pairs, workers)
        return sorted(uri for _, uri in pairs)

    def delete_prefix(self, uri_prefix: str) -> int:
        """Delete everything under ``uri_prefix``; returns how many objects/files were deleted."""
        if not is_s3(uri_prefix):
            root = Path(uri_prefix)
            if root.is_file():
                root.unlink()
                return 1
            if not root.is_dir():
                return 0
            count = sum(1 for p in root.rglob("*") if p.is_file())
            shutil.rmtree(root)
            return count
        uris = self.list(uri_prefix)
        bucket = split_s3(uri_prefix)[0]
        for start in range(0, len(uris), 1000):  # the API's limit per call
            batch = [{"Key": split_s3(u)[1]} for u in uris[start : start + 1000]]
            with self._s3_errors("delete", uri_prefix):
                resp = self.client.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
            if resp.get("Errors"):
                first = resp["Errors"][0]
                if first.get("Code") in _AUTH_CODES:
                    raise S3AuthError(
                        f"the object store at {self.endpoint_name} refused to delete {first.get('Key')} "
                        f"({first.get('Code')}); check the delete permission of the credentials on bucket {bucket}."
                    )
                raise OSError(f"could not delete {len(resp['Errors'])} objects under {uri_prefix}: {first}")
        return len(uris)


def _atomic_write(path: Path, write: Any) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``: readers see the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _parallel(fn: Any, items: list[Any], workers: int) -> None:
    """Run ``fn`` over ``items`` on a thread pool; the first failure is raised (after the rest finish)."""
    if workers <= 1 or len(items) <= 1:
        for item in items:
            fn(item)
        return
    with ThreadPoolExecutor(max_workers=min(workers, len(items))) as pool:
        for future in [pool.submit(fn, item) for item in items]:
            future.result()
