"""``kube.secret_labels`` asks a (loopback) API server for a Secret's metadata only: the request
carries the PartialObjectMetadata Accept header, so the server never sends the data."""

from __future__ import annotations

import base64

import pytest

from finetune_operator import kube
from loopback_api import JsonHandler, serving

VALUE = "partial-meta-secret-value"


class _API(JsonHandler):
    """Answers as kube-apiserver does: metadata only when the Accept header asks for it."""

    accepts: list[str] = []

    def do_GET(self) -> None:  # noqa: N802
        accept = self.headers.get("Accept", "")
        type(self).accepts.append(accept)
        name = self.path.rsplit("/", 1)[-1]
        if name == "missing":
            status, doc = 404, {"kind": "Status", "code": 404, "message": f'secrets "{name}" not found'}
        elif name == "forbidden":
            status, doc = 403, {"kind": "Status", "code": 403, "message": f'secrets "{name}" is forbidden'}
        else:
            meta = {"name": name, "namespace": "ns", "labels": {"finetune.io/credentials": "true"}}
            status = 200
            if "as=PartialObjectMetadata" in accept:
                doc = {"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata", "metadata": meta}
            else:
                doc = {"apiVersion": "v1", "kind": "Secret", "metadata": meta, "data": {"AWS_SECRET_ACCESS_KEY": base64.b64encode(VALUE.encode()).decode()}}
        self.send_json(status, doc)


@pytest.fixture
def apiserver(monkeypatch):
    _API.accepts = []
    with serving(_API, monkeypatch):
        yield _API


def test_secret_labels_reads_metadata_only(apiserver):
    assert kube.secret_labels("ns", "s3") == {"finetune.io/credentials": "true"}
    assert apiserver.accepts == ["application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1"]
    assert kube.secret_labels("ns", "missing") is None
    with pytest.raises(kube.SecretForbidden, match="forbidden"):
        kube.secret_labels("ns", "forbidden")


def test_the_full_read_is_a_different_request(apiserver):
    """The control: the loopback server does send data when not asked for metadata only."""
    assert kube.secret_keys("ns", "s3") == {"AWS_SECRET_ACCESS_KEY"}
    assert "PartialObjectMetadata" not in apiserver.accepts[0]
