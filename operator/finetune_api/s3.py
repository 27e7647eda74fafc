"""``s3://`` URIs and boto3 clients, the same for the operator and the trainer.

Both sides reach the same object store from the same ``spec.storage`` (endpoint, region, credentials),
so they split URIs and configure clients in one place: an S3-compatible endpoint (MinIO, Ceph, ...)
gets path-style addressing on both, or one side would find a bucket the other cannot. What differs is
the patience: the trainer retries (a checkpoint upload must get through), the operator's progress read
is best-effort and must never hold a reconcile up, so each passes its own timeouts and attempts.

boto3 is a base dependency but is imported on first use, so importing this module stays cheap.
"""

from __future__ import annotations

from typing import Any, Mapping

S3_SCHEME = "s3://"

CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
"""The keys of ``storage.credentialsSecret`` a client takes (the names of the AWS environment variables)."""


def is_s3(uri: str) -> bool:
    return uri.startswith(S3_SCHEME)


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``; ``s3://bucket`` -> ``("bucket", "")``.

    Raises ValueError for a URI that is not ``s3://`` or names no bucket."""
    if not is_s3(uri):
        raise ValueError(f"not an s3:// URI: {uri}")
    bucket, _, key = uri[len(S3_SCHEME) :].partition("/")
    if not bucket:
        raise ValueError(f"s3 URI without a bucket: {uri}")
    return bucket, key


def s3_client(
    *,
    endpoint_url: str | None,
    region: str | None,
    connect_timeout: float,
    read_timeout: float,
    max_attempts: int,
    retry_mode: str | None = None,
    max_pool_connections: int | None = None,
    credentials: Mapping[str, str] | None = None,
    ambient_credentials: bool = True,
    signature_version: str | None = None,
) -> Any:
    """A new boto3 S3 client (on its own session, so threads never share a session's state).

    ``endpoint_url`` set means an S3-compatible store: path-style addressing, which MinIO and most such
    stores need. ``credentials`` holds ``AWS_*`` values (see :data:`CREDENTIAL_ENV`). Without them, what
    happens is ``ambient_credentials``'s choice: True (the trainer, whose environment *is* the job's)
    lets boto3's standard chain (environment, IRSA, instance profile) find some; False (the operator,
    whose environment and cloud identity are its own, never a tenant's) makes the client unsigned, so
    boto3 never looks for credentials at all and every request goes out anonymous. ``retry_mode``,
    ``max_pool_connections`` and ``signature_version`` (``s3v4`` for presigned URLs, which botocore
    would otherwise sign with the legacy SigV2) left at None keep botocore's defaults.
    """
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config

    retries: dict[str, Any] = {"max_attempts": max_attempts}
    if retry_mode is not None:
        retries["mode"] = retry_mode
    options: dict[str, Any] = {
        "connect_timeout": connect_timeout,
        "read_timeout": read_timeout,
        "retries": retries,
        "s3": {"addressing_style": "path"} if endpoint_url else None,
    }
    if max_pool_connections is not None:
        options["max_pool_connections"] = max_pool_connections
    if signature_version is not None:
        options["signature_version"] = signature_version
    creds = credentials or {}
    if not ambient_credentials and not creds.get("AWS_ACCESS_KEY_ID"):
        options["signature_version"] = UNSIGNED
        creds = {}
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint_url,
        region_name=region,
        aws_access_key_id=creds.get("AWS_ACCESS_KEY_ID"),
        aws_secret_access_key=creds.get("AWS_SECRET_ACCESS_KEY"),
        aws_session_token=creds.get("AWS_SESSION_TOKEN"),
        config=Config(**options),
    )
