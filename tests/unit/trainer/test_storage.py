"""Storage: the same operations on local paths and on S3 (moto), and botocore failures as trainer errors."""

from __future__ import annotations

import time
from pathlib import Path

import boto3
import pytest
import requests
from moto import mock_aws
from moto.server import ThreadedMotoServer

from finetune_trainer.errors import S3AuthError, S3EndpointError
from finetune_trainer.storage import Storage, join

SECRET = "wrong-secret-never-to-be-printed"


@pytest.fixture
def aws_env(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for var in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def s3_root(aws_env):
    with mock_aws():
        boto3.client("s3", region_name="us-east-1").create_bucket(Bucket="bucket")
        yield "s3://bucket/root"


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        yield str(tmp_path / "root")
    else:
        yield request.getfixturevalue("s3_root")


def test_join():
    assert join("s3://b/a", "x") == "s3://b/a/x"
    assert join("s3://b/a/", "/x/", "y.json") == "s3://b/a/x/y.json"
    assert join("s3://b", "x") == "s3://b/x"
    assert join("/data/a", "x", "y") == "/data/a/x/y"
    assert join("/data/a/", "") == "/data/a/"


def test_roundtrip_list_exists_delete(root, tmp_path):
    storage = Storage()
    storage.write_bytes(join(root, "a.txt"), b"alpha")
    storage.write_json(join(root, "sub/b.json"), {"x": [1, 2]})
    storage.write_bytes(join(root, "sub/deeper/c.bin"), b"\x00\x01")
    storage.write_bytes(root + "2/other.txt", b"sibling prefix, not under root")

    assert storage.read_bytes(join(root, "a.txt")) == b"alpha"
    assert storage.read_json(join(root, "sub/b.json")) == {"x": [1, 2]}
    assert storage.list(root) == [join(root, "a.txt"), join(root, "sub/b.json"), join(root, "sub/deeper/c.bin")]
    assert storage.list(join(root, "sub")) == [join(root, "sub/b.json"), join(root, "sub/deeper/c.bin")]
    assert storage.list(join(root, "a.txt")) == [join(root, "a.txt")]
    assert storage.list(join(root, "nothing")) == []
    assert storage.exists(join(root, "a.txt"))
    assert storage.exists(join(root, "sub"))  # a prefix with objects under it
    assert not storage.exists(join(root, "missing.txt"))
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(join(root, "missing.txt"))

    assert storage.delete_prefix(join(root, "sub")) == 2
    assert storage.list(root) == [join(root, "a.txt")]
    assert storage.read_bytes(root + "2/other.txt") == b"sibling prefix, not under root"


def test_upload_and_download_dirs(root, tmp_path):
    storage = Storage()
    src = tmp_path / "src"
    for rel, data in {"model.safetensors": b"w" * 1000, "config.json": b"{}", "tok/vocab.txt": b"a\nb"}.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    uris = storage.upload_dir(src, join(root, "model"), workers=4)
    assert uris == [join(root, "model", r) for r in ("config.json", "model.safetensors", "tok/vocab.txt")]

    dst = storage.download_prefix(join(root, "model"), tmp_path / "dst", workers=4)
    assert sorted(p.relative_to(dst).as_posix() for p in dst.rglob("*") if p.is_file()) == [
        "config.json",
        "model.safetensors",
        "tok/vocab.txt",
    ]
    assert (dst / "model.safetensors").read_bytes() == b"w" * 1000
    one = storage.download(join(root, "model/tok/vocab.txt"), tmp_path / "x" / "v.txt")
    assert one.read_bytes() == b"a\nb"
    storage.upload_file(one, join(root, "copy.txt"))
    assert storage.read_bytes(join(root, "copy.txt")) == b"a\nb"
    with pytest.raises(FileNotFoundError):
        storage.download(join(root, "nope"), tmp_path / "nope")


def test_local_writes_leave_no_temp_files(tmp_path):
    storage = Storage()
    storage.write_json(str(tmp_path / "p.json"), {"step": 1})
    storage.write_json(str(tmp_path / "p.json"), {"step": 2})
    assert [p.name for p in tmp_path.iterdir()] == ["p.json"]
    assert storage.read_json(str(tmp_path / "p.json")) == {"step": 2}


def test_missing_bucket_is_file_not_found(s3_root):
    storage = Storage()
    with pytest.raises(FileNotFoundError):
        storage.read_bytes("s3://no-such-bucket/x")
    with pytest.raises(FileNotFoundError):
        storage.list("s3://no-such-bucket/x")
    assert not storage.exists("s3://no-such-bucket/x")


def test_from_spec():
    from finetune_api.spec import StorageSpec

    storage = Storage.from_spec(StorageSpec(endpoint="http://minio:9000", region="eu-west-1"))
    assert (storage.endpoint_url, storage.region) == ("http://minio:9000", "eu-west-1")
    assert storage.client.meta.endpoint_url == "http://minio:9000"
    assert storage.client.meta.config.connect_timeout == 5


@pytest.fixture
def moto_server(aws_env):
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    from moto import settings

    previous = settings.INITIAL_NO_AUTH_ACTION_COUNT  # the server runs in this process: restore what it changes
    try:
        yield endpoint
    finally:
        server.stop()
        settings.INITIAL_NO_AUTH_ACTION_COUNT = previous


def test_wrong_credentials_raise_s3_auth_error(moto_server, monkeypatch, tmp_path):
    good = Storage(endpoint_url=moto_server, region="us-east-1")
    good.client.create_bucket(Bucket="data")
    good.write_bytes("s3://data/train.jsonl", b'{"text": "x"}\n')
    assert good.read_bytes("s3://data/train.jsonl") == b'{"text": "x"}\n'  # path-style works against the server

    # From here on the server checks credentials, and these are unknown to it.
    requests.post(f"{moto_server}/moto-api/reset-auth", data=b"0", timeout=5).raise_for_status()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGKEY")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    bad = Storage(endpoint_url=moto_server, region="us-east-1")
    with pytest.raises(S3AuthError) as err:
        bad.read_bytes("s3://data/train.jsonl")
    message = err.value.line()
    assert message.startswith("S3AuthError: ")
    assert moto_server in message and "InvalidAccessKeyId" in message and "AWS_SECRET_ACCESS_KEY" in message
    assert SECRET not in message
    with pytest.raises(S3AuthError):
        bad.list("s3://data/")
    with pytest.raises(S3AuthError):
        bad.exists("s3://data/train.jsonl")
    local = Path(tmp_path / "f.txt")
    local.write_text("x")
    with pytest.raises(S3AuthError):
        bad.upload_file(local, "s3://data/f.txt")  # boto3 wraps this one in S3UploadFailedError
    with pytest.raises(S3AuthError):
        bad.download("s3://data/train.jsonl", tmp_path / "d.jsonl")


def test_unreachable_endpoint_fails_fast(aws_env):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    storage = Storage(endpoint_url=f"http://127.0.0.1:{port}", region="us-east-1")
    started = time.monotonic()
    with pytest.raises(S3EndpointError) as err:
        storage.read_bytes("s3://data/train.jsonl")
    assert time.monotonic() - started < 15
    assert f"127.0.0.1:{port}" in err.value.message and "storage.endpoint" in err.value.message
    assert err.value.permanent is False


def test_missing_credentials_raise_s3_auth_error(monkeypatch, tmp_path):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    storage = Storage(endpoint_url="http://127.0.0.1:1", region="us-east-1")
    with pytest.raises(S3AuthError, match="no S3 credentials"):
        storage.read_bytes("s3://data/x")


@pytest.mark.parametrize("code,status", [("InternalError", 500), ("SlowDown", 503), ("ServiceUnavailable", 503)])
def test_a_failing_store_is_a_retryable_endpoint_error(code, status):
    from botocore.exceptions import ClientError

    storage = Storage(endpoint_url="http://127.0.0.1:9")
    response = {"Error": {"Code": code, "Message": "x"}, "ResponseMetadata": {"HTTPStatusCode": status}}
    with pytest.raises(S3EndpointError, match=f"kept failing to read s3://b/k \\({code}\\)") as info:
        with storage._s3_errors("read", "s3://b/k"):
            raise ClientError(response, "GetObject")
    assert not info.value.permanent  # the operator restarts the group instead of failing the job
    with pytest.raises(ClientError):  # anything else is not guessed at
        with storage._s3_errors("read", "s3://b/k"):
            raise ClientError({"Error": {"Code": "InvalidRange"}, "ResponseMetadata": {"HTTPStatusCode": 416}}, "GetObject")
