"""s3:// URIs and the one client factory: the trainer's and the operator's clients keep their settings."""

from __future__ import annotations

import pytest

from finetune_api.s3 import is_s3, s3_client, split_s3
from finetune_api.spec import parse_spec


@pytest.mark.parametrize(
    "uri,expected",
    [
        ("s3://bucket/a/b.json", ("bucket", "a/b.json")),
        ("s3://bucket", ("bucket", "")),
        ("s3://bucket/", ("bucket", "")),
        ("s3://bucket/prefix/", ("bucket", "prefix/")),
        ("s3://bucket//double", ("bucket", "/double")),
        ("s3://my.bucket-1/k", ("my.bucket-1", "k")),
    ],
)
def test_split_s3(uri, expected):
    assert is_s3(uri)
    assert split_s3(uri) == expected


@pytest.mark.parametrize("uri", ["/data/train.jsonl", "S3://bucket/k", "s3:/bucket/k", "gs://bucket/k", "", "s3://", "s3:///key"])
def test_split_s3_refuses_what_is_not_an_s3_object(uri):
    with pytest.raises(ValueError):
        split_s3(uri)


def test_is_s3_is_only_the_scheme():
    assert is_s3("s3://") and not is_s3("/s3://x") and not is_s3("hf://org/model")


@pytest.fixture
def no_aws_env(monkeypatch):
    for var in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_RETRY_MODE", "AWS_MAX_ATTEMPTS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")


def test_client_for_an_s3_compatible_endpoint_uses_path_style(no_aws_env):
    client = s3_client(endpoint_url="http://minio:9000", region="eu-1", connect_timeout=2, read_timeout=7, max_attempts=4,
                       retry_mode="standard", max_pool_connections=12, credentials={"AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "key"})
    config = client.meta.config
    assert client.meta.endpoint_url == "http://minio:9000" and client.meta.region_name == "eu-1"
    assert (config.connect_timeout, config.read_timeout, config.max_pool_connections) == (2, 7, 12)
    # botocore counts the first try too: max_attempts retries means max_attempts + 1 attempts in all.
    assert config.retries == {"total_max_attempts": 5, "mode": "standard"}
    assert config.s3 == {"addressing_style": "path"}
    creds = client._request_signer._credentials
    assert (creds.access_key, creds.secret_key, creds.token) == ("id", "key", None)


def test_client_for_aws_keeps_botocore_defaults(no_aws_env):
    client = s3_client(endpoint_url=None, region="us-west-2", connect_timeout=3, read_timeout=3, max_attempts=1)
    config = client.meta.config
    assert config.s3 is None or "addressing_style" not in config.s3
    assert config.max_pool_connections == 10  # botocore's default
    assert config.retries["total_max_attempts"] == 2
    assert "amazonaws.com" in client.meta.endpoint_url


def test_trainer_storage_client_settings(no_aws_env):
    from finetune_trainer.storage import CONNECT_TIMEOUT_S, MAX_ATTEMPTS, READ_TIMEOUT_S, Storage

    config = Storage(endpoint_url="http://minio:9000", region="eu-1").client.meta.config
    assert (config.connect_timeout, config.read_timeout, config.max_pool_connections) == (CONNECT_TIMEOUT_S, READ_TIMEOUT_S, 32)
    assert config.retries == {"total_max_attempts": MAX_ATTEMPTS + 1, "mode": "standard"}
    assert config.s3 == {"addressing_style": "path"}


def test_operator_progress_client_settings(no_aws_env):
    from finetune_operator.progress import ProgressReader

    spec = parse_spec({"model": {"uri": "s3://models/m"}, "dataset": {"train": "s3://data/t.jsonl"}, "output": {"uri": "s3://out/r"},
                       "storage": {"endpoint": "http://minio:9000"}})
    reader = ProgressReader(credentials=lambda ns, name: None, timeout=1.5)
    client = reader._client(spec, {"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b", "AWS_SESSION_TOKEN": "t"})
    config = client.meta.config
    assert client.meta.region_name == "us-east-1"  # the operator's default when storage.region is unset
    assert (config.connect_timeout, config.read_timeout) == (1.5, 1.5)
    assert config.retries["total_max_attempts"] == 2
    assert config.s3 == {"addressing_style": "path"}
    assert client._request_signer._credentials.token == "t"
    assert reader._client(spec, {"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b", "AWS_SESSION_TOKEN": "t"}) is client  # cached
