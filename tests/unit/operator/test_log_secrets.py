"""``logLevel: DEBUG`` never prints a secret value: the operator reads a job's credentials Secret from
a (loopback) Kubernetes API and signs a progress read with it, at DEBUG, and the log is grepped for the
values, their base64 and the signature."""

from __future__ import annotations

import base64
import io
import logging

import pytest

from finetune_api.spec import parse_spec
from finetune_operator import kube, logsafe
from finetune_operator.progress import ProgressReader, secret_values
from finetune_operator.tenant_io import Limits
from hostile_s3 import HostileS3
from loopback_api import JsonHandler, serving

SECRET = {"AWS_ACCESS_KEY_ID": "LOGKEYID", "AWS_SECRET_ACCESS_KEY": "log-secret-value-9f8e7d", "AWS_SESSION_TOKEN": "log-session-token-1a2b3c"}


class _SecretAPI(JsonHandler):
    """Just enough kube-apiserver for ``read_namespaced_secret``."""

    def do_GET(self) -> None:  # noqa: N802
        self.send_json(200, {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3", "namespace": "team-a"},
                             "data": {k: base64.b64encode(v.encode()).decode() for k, v in SECRET.items()}})


@pytest.fixture
def apiserver(monkeypatch):
    with serving(_SecretAPI, monkeypatch):
        yield


@pytest.fixture
def debug_log(monkeypatch):
    """Root at DEBUG into a buffer, as ``FINETUNE_LOG_LEVEL=DEBUG`` sets it; library levels restored after."""
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    root = logging.getLogger()
    saved = {name: logging.getLogger(name).level for name in logsafe.CHATTY_LIBRARIES}
    for name in saved:
        logging.getLogger(name).setLevel(logging.NOTSET)
    monkeypatch.setattr(root, "level", logging.DEBUG)
    root.addHandler(handler)
    yield handler, buffer
    root.removeHandler(handler)
    for name, level in saved.items():
        logging.getLogger(name).setLevel(level)


def _read_secret_and_progress(endpoint: str) -> None:
    spec = parse_spec({"model": {"uri": "s3://models/m"}, "dataset": {"train": "s3://data/t.jsonl"}, "output": {"uri": "s3://stable/job"},
                       "storage": {"endpoint": endpoint, "credentialsSecret": {"name": "s3"}}})
    assert kube.secret_keys("team-a", "s3") == set(SECRET)
    reader = ProgressReader(secret_values(kube.read_secret), interval=0, limits=Limits(deadline=3))
    assert reader.read("uid", "team-a", spec, force=True).step == 7


def _leaks(text: str) -> list[str]:
    needles = [*SECRET.values(), *(base64.b64encode(v.encode()).decode() for v in SECRET.values())]
    return [n for n in needles if n in text and n != SECRET["AWS_ACCESS_KEY_ID"]]


def test_without_the_filter_debug_logs_do_carry_the_secret(apiserver, debug_log):
    """The control: the libraries do print these values at DEBUG, so the next test is meaningful."""
    _, buffer = debug_log
    with HostileS3() as s3:
        _read_secret_and_progress(s3.endpoint)
    leaks = _leaks(buffer.getvalue())
    assert SECRET["AWS_SESSION_TOKEN"] in leaks and base64.b64encode(SECRET["AWS_SECRET_ACCESS_KEY"].encode()).decode() in leaks, leaks


def test_at_debug_no_secret_value_reaches_the_log(apiserver, debug_log):
    handler, buffer = debug_log
    logsafe.install([handler])
    with HostileS3() as s3:
        _read_secret_and_progress(s3.endpoint)
    text = buffer.getvalue()
    assert _leaks(text) == []
    assert "X-Amz-Signature" not in text and "response body" not in text
    logging.getLogger("finetune_operator.progress").debug("our own DEBUG lines still show")
    assert "our own DEBUG lines still show" in buffer.getvalue()


def test_a_child_logger_set_to_debug_is_still_filtered(debug_log):
    handler, buffer = debug_log
    logsafe.install([handler])
    rest = logging.getLogger("kubernetes.client.rest")
    saved = rest.level
    rest.setLevel(logging.DEBUG)  # what kubernetes' Configuration.debug = True does
    try:
        rest.debug("response body: %s", SECRET["AWS_SECRET_ACCESS_KEY"])
        rest.info("kept: INFO and above pass")
    finally:
        rest.setLevel(saved)
    assert SECRET["AWS_SECRET_ACCESS_KEY"] not in buffer.getvalue() and "kept: INFO and above pass" in buffer.getvalue()
