"""The progress reader against a hostile endpoint on loopback: every read ends within its deadline,
memory stays bounded, other jobs keep being read, the job gets a clear one-line problem, and nothing
but the job's own Secret ever signs a request."""

from __future__ import annotations

import asyncio
import gc
import time

import psutil
import pytest

from finetune_api.spec import parse_spec
from finetune_operator.config import OperatorConfig
from finetune_operator.progress import ProgressReader, check_allowlist, endpoint_allowed
from finetune_operator.tenant_io import Limits
from hostile_s3 import HostileS3

DEADLINE = 3.0  # > the drip's 2 s between bytes: a per-read timeout of the same size would never fire
SLACK = 1.5  # thread scheduling on a busy 2-core machine
SECRET = {"AWS_ACCESS_KEY_ID": "JOBKEYID", "AWS_SECRET_ACCESS_KEY": "job-secret-value-1234", "AWS_SESSION_TOKEN": "job-token-5678"}


@pytest.fixture(scope="module")
def server():
    with HostileS3() as s:
        yield s


@pytest.fixture
def no_ambient_aws(monkeypatch, tmp_path):
    for var in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def _spec(bucket: str, endpoint: str, secret: bool = False):
    storage = {"endpoint": endpoint, **({"credentialsSecret": {"name": "s3"}} if secret else {})}
    return parse_spec({"model": {"uri": "s3://models/m"}, "dataset": {"train": "s3://data/t.jsonl"},
                       "output": {"uri": f"s3://{bucket}/job"}, "storage": storage})


def _reader(**kw) -> ProgressReader:
    kw.setdefault("limits", Limits(deadline=DEADLINE))
    return ProgressReader(credentials=lambda ns, name: dict(SECRET) if name == "s3" else None, interval=0, **kw)


def _warm(reader: ProgressReader, server: HostileS3) -> None:
    """Build the reader's (cached) signing client first: creating a boto3 client is CPU work outside
    the read's deadline, done once per endpoint and credentials, and slow on a loaded machine."""
    assert reader.read("warm-up", "ns", _spec("stable", server.endpoint), force=True).step == 7


HOSTILE = [
    ("endless", "over the 1048576-byte cap"),
    ("big-chunked", "over the 1048576-byte cap"),
    ("big", "is 209715200 bytes, over the 1048576-byte cap"),
    ("drip", "no complete answer within the 3s deadline"),
    ("drip-headers", "no complete answer within the 3s deadline"),
    ("nan", "holds NaN, which JSON does not allow"),
    ("infinity", "holds a number out of range"),
    ("nan-string", "holds a number that is NaN or infinite"),
    ("huge-int", "holds an integer out of range"),
    ("deep", "nested too deeply to parse"),
    ("deep-array", "nested too deeply to parse"),
    ("nested", "nested deeper than 16 levels at $.evaluation.baseline.a.a"),
    ("array", "must hold a JSON object, not an array"),
    ("long-string", "a string of 100000 characters at $.stage, over the 2048-character cap"),
    ("wrong-type", "does not match the progress schema: step: Input should be a valid integer"),
    ("redirect", "answered a redirect (HTTP 302), which the operator does not follow"),
]


@pytest.mark.parametrize("bucket,problem", HOSTILE, ids=[b for b, _ in HOSTILE])
def test_each_hostile_answer_ends_within_the_deadline_with_a_clear_problem(server, no_ambient_aws, bucket, problem):
    reader = _reader()
    _warm(reader, server)
    started = time.monotonic()
    doc = reader.read(bucket, "ns", _spec(bucket, server.endpoint), force=True)
    elapsed = time.monotonic() - started
    assert doc is None
    assert elapsed < DEADLINE + SLACK, f"{bucket}: {elapsed:.1f}s"
    message = reader.problem(bucket)
    assert message is not None and problem in message, message
    assert message.startswith(f"progress s3://{bucket}/job/progress.json: ") and "\n" not in message and len(message) < 400
    assert "do-not-echo" not in message  # what the endpoint sent is never copied into the message


def test_a_hostile_answer_never_wipes_the_last_good_document_and_a_good_read_clears_the_problem(server, no_ambient_aws):
    reader = _reader()
    good, nan = _spec("stable", server.endpoint), _spec("nan", server.endpoint)
    assert reader.read("job", "ns", good, force=True).step == 7 and reader.problem("job") is None
    assert reader.read("job", "ns", nan, force=True).step == 7  # the refused document changes nothing
    assert "NaN" in reader.problem("job")
    assert reader.read("job", "ns", good, force=True).step == 7 and reader.problem("job") is None


def test_the_etag_makes_an_unchanged_document_a_304(server, no_ambient_aws):
    reader = _reader()
    spec = _spec("stable", server.endpoint)
    before = len(server.seen("stable"))
    reader.read("etag", "ns", spec, force=True)
    assert reader.read("etag", "ns", spec, force=True).step == 7
    first, second = server.seen("stable")[before:]
    assert "If-None-Match" not in first[2] and second[2]["If-None-Match"] == '"v1"'


def test_rss_stays_bounded_while_hostile_endpoints_send_hundreds_of_megabytes(server, no_ambient_aws):
    reader = _reader()
    gc.collect()
    rss_before = psutil.Process().memory_info().rss
    peak = rss_before
    for round_ in range(3):
        for bucket in ("endless", "big-chunked", "big", "deep", "deep-array"):
            reader.read(f"{bucket}-{round_}", "ns", _spec(bucket, server.endpoint), force=True)
            peak = max(peak, psutil.Process().memory_info().rss)
    assert peak - rss_before < 40 * 2**20, f"RSS grew by {(peak - rss_before) / 2**20:.0f} MiB"
    assert server.hung_up >= 3  # the reader stopped reading and closed: the server saw the broken pipe


def test_a_good_job_keeps_being_read_while_stuck_endpoints_hold_readers(server, no_ambient_aws):
    """More drip jobs than pool threads: each holds a worker for at most the deadline, and the good
    job's document keeps advancing meanwhile."""
    reader = _reader(workers=4)
    stuck = [(f"stuck-{i}", _spec("drip", server.endpoint)) for i in range(6)]
    good = _spec("good", server.endpoint)
    steps = set()
    started = time.monotonic()
    while time.monotonic() - started < 3 * DEADLINE:
        for uid, spec in stuck:
            reader.read(uid, "ns", spec)
        doc = reader.read("good", "ns", good)
        if doc is not None:
            steps.add(doc.step)
        time.sleep(0.05)
    reader.flush(timeout=DEADLINE + SLACK)
    assert len(steps) >= 2, steps
    assert all("deadline" in (reader.problem(uid) or "") for uid, _ in stuck)


def test_a_final_read_in_a_reconcile_thread_ends_within_the_deadline(server, no_ambient_aws):
    reader = _reader()
    _warm(reader, server)
    started = time.monotonic()
    reader.read("final", "ns", _spec("drip", server.endpoint), force=True)
    assert time.monotonic() - started < DEADLINE + SLACK


# --------------------------------------------------------------------------------- credentials


def test_a_job_without_a_secret_is_read_anonymously_even_with_aws_keys_in_the_operators_env(server, no_ambient_aws, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "OPERATORKEY")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "operator-secret")
    before = len(server.seen("stable"))
    assert _reader().read("anon", "ns", _spec("stable", server.endpoint), force=True).step == 7
    (_, query, headers), = server.seen("stable")[before:]
    assert "Authorization" not in headers and not any(k.lower().startswith("x-amz") for k in headers)
    assert not any(k.startswith("X-Amz-") for k in query), query


def test_a_job_without_a_secret_never_fetches_ambient_credentials(server, no_ambient_aws, monkeypatch):
    """Container credentials (EKS pod identity, ECS) would be fetched from this URI by boto3's chain."""
    monkeypatch.setenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", f"{server.endpoint}/creds/latest")
    before = len(server.seen("creds"))
    assert _reader().read("anon2", "ns", _spec("stable", server.endpoint), force=True).step == 7
    assert server.seen("creds")[before:] == []


def test_a_job_with_a_secret_signs_with_that_secret_only(server, no_ambient_aws, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "OPERATORKEY")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "operator-secret")
    before = len(server.seen("stable"))
    assert _reader().read("signed", "ns", _spec("stable", server.endpoint, secret=True), force=True).step == 7
    (_, query, headers), = server.seen("stable")[before:]
    assert query["X-Amz-Credential"][0].startswith("JOBKEYID/") and query["X-Amz-Security-Token"] == ["job-token-5678"]
    everything = repr((query, headers))
    assert "OPERATORKEY" not in everything and "job-secret-value-1234" not in everything


# ----------------------------------------------------------------------------------- allow-list


@pytest.mark.parametrize("endpoint,allowlist,allowed", [
    ("http://minio:9000", (), True),
    ("http://minio:9000", ("http://minio:9000",), True),
    ("http://MinIO:9000/", ("http://minio:9000",), True),
    ("http://minio:9001", ("http://minio:9000",), False),
    ("https://minio:9000", ("http://minio:9000",), False),
    ("https://s3.eu.example.com", ("https://*.example.com",), True),
    ("https://example.com", ("https://*.example.com",), False),
    ("https://evil-example.com", ("https://*.example.com",), False),
    ("https://store.example.com:443", ("https://store.example.com",), True),
    ("http://169.254.169.254", ("http://minio:9000", "aws"), False),
    ("http://user:pw@minio:9000", ("http://minio:9000",), True),
    (None, ("http://minio:9000",), False),
    (None, ("AWS",), True),
])
def test_endpoint_allowed(endpoint, allowlist, allowed):
    assert endpoint_allowed(endpoint, allowlist) is allowed


@pytest.mark.parametrize("entry", ["minio:9000", "ftp://minio", "http://minio:9000/bucket", "http://"])
def test_a_malformed_allowlist_entry_is_refused_at_startup(entry):
    with pytest.raises(ValueError):
        check_allowlist(("aws", entry))


def test_an_endpoint_outside_the_allowlist_is_never_contacted(server, no_ambient_aws):
    reader = _reader(allowed_endpoints=("https://s3.internal.example.com",))
    before = len(server.requests)
    assert reader.read("ssrf", "ns", _spec("stable", server.endpoint), force=True) is None
    assert len(server.requests) == before
    problem = reader.problem("ssrf")
    assert f"storage.endpoint {server.endpoint} is not one of the operator's allowed storage endpoints (https://s3.internal.example.com)" in problem
    assert "storage.allowedEndpoints" in problem


def test_the_operator_reader_takes_limits_and_allowlist_from_the_environment(tmp_path):
    config = OperatorConfig.from_env({"FINETUNE_PROGRESS_DEADLINE_SECONDS": "2.5", "FINETUNE_PROGRESS_MAX_BYTES": "65536",
                                      "FINETUNE_ALLOWED_ENDPOINTS": "http://minio:9000, aws"})
    reader = ProgressReader.from_config(config, credentials=lambda ns, name: None)
    assert (reader.limits.deadline, reader.limits.max_bytes) == (2.5, 65536)
    assert reader.allowed_endpoints == ("http://minio:9000", "aws")
    assert OperatorConfig.from_env({}).allowed_endpoints == () and OperatorConfig.from_env({}).progress_deadline_seconds == 5.0
    # In a cluster the operator's own filesystem is never read as a job's output.
    (tmp_path / "progress.json").write_text('{"step": 3}')
    spec = parse_spec({"model": {"uri": "s3://models/m"}, "dataset": {"train": "s3://data/t"}, "output": {"uri": str(tmp_path)}})
    assert reader.read("local", "ns", spec, force=True) is None
    assert "s3:// outputs only" in reader.problem("local")


# -------------------------------------------------------------------------------- resync loop


def test_the_resync_loop_never_waits_behind_a_stuck_job(monkeypatch):
    from finetune_operator import main

    calls: list[str] = []
    release = asyncio.Event()

    async def fake_reconcile(body, handler):
        calls.append(body["metadata"]["name"])
        if body["metadata"]["name"] == "stuck":
            await release.wait()

    monkeypatch.setattr(main, "_reconcile", fake_reconcile)
    bodies = {("ns", n): [{"metadata": {"namespace": "ns", "name": n}}] for n in ("stuck", "a", "b")}

    async def rounds():
        started = []
        for _ in range(3):
            started.append(main.resync_round(list(bodies), bodies.__getitem__))
            await asyncio.sleep(0.02)
        release.set()
        await asyncio.sleep(0.01)
        return started

    started = asyncio.run(rounds())
    assert started == [3, 2, 2]  # the stuck job is skipped while it runs, the others go every round
    assert calls.count("stuck") == 1 and calls.count("a") == 3 and calls.count("b") == 3
    assert not main._resyncing


# ------------------------------------------------------------------------------------------ TLS


def _self_signed(tmp_path):
    """A certificate for 127.0.0.1, signed by itself (a private CA)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "loopback-store")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = tmp_path / "store.crt", tmp_path / "store.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return str(cert_file), str(key_file)


def test_https_endpoints_are_verified_against_the_system_cas_or_the_configured_bundle(no_ambient_aws, tmp_path):
    import ssl

    cert, key = _self_signed(tmp_path)
    with HostileS3() as s3:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        s3.socket = context.wrap_socket(s3.socket, server_side=True)
        spec = _spec("stable", s3.endpoint.replace("http://", "https://"))
        untrusting = _reader()
        assert untrusting.read("tls", "ns", spec, force=True) is None
        assert "SSLCertVerificationError" in untrusting.problem("tls")
        config = OperatorConfig.from_env({"AWS_CA_BUNDLE": cert, "FINETUNE_PROGRESS_DEADLINE_SECONDS": "3"})
        trusting = ProgressReader.from_config(config, credentials=lambda ns, name: None)
        assert trusting.read("tls", "ns", spec, force=True).step == 7 and trusting.problem("tls") is None


# ------------------------------------------------------------------------------ a real S3 server


def test_a_real_s3_implementation_is_read_signed_with_etag_and_missing_key(no_ambient_aws):
    """moto's S3 server: the presigned GET, the 304 on an unchanged ETag and a 404 before the trainer wrote anything."""
    import json

    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="a", aws_secret_access_key="b")
        s3.create_bucket(Bucket="runs")
        reader = _reader()
        spec = _spec("runs", endpoint, secret=True)
        assert reader.read("moto", "ns", spec, force=True) is None and reader.problem("moto") is None  # 404: not written yet
        s3.put_object(Bucket="runs", Key="job/progress.json", Body=json.dumps({"stage": "training", "step": 42}).encode())
        assert reader.read("moto", "ns", spec, force=True).step == 42
        etag = reader._entries["moto"].etag
        assert etag and etag.startswith('"')
        assert reader.read("moto", "ns", spec, force=True).step == 42 and reader._entries["moto"].etag == etag  # a 304
        s3.put_object(Bucket="runs", Key="job/progress.json", Body=json.dumps({"stage": "training", "step": 43}).encode())
        assert reader.read("moto", "ns", spec, force=True).step == 43
    finally:
        server.stop()
