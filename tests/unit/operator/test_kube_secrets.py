"""``kube.secret_labels`` asks a (loopback) API server for a Secret's metadata only: the request
carries the PartialObjectMetadata Accept header, so the server never sends the data."""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from kubernetes import client

from finetune_operator import kube

VALUE = "partial-meta-secret-value"


class _API(BaseHTTPRequestHandler):
    """Answers as kube-apiserver does: metadata only when the Accept header asks for it."""

    accepts: list[str] = []

    def log_message(self, *args: object) -> None:
        pass

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
        body = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def apiserver(monkeypatch):
    _API.accepts = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _API)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    cfg = client.Configuration()
    cfg.host = f"http://127.0.0.1:{server.server_port}"
    monkeypatch.setattr(kube, "_api", client.ApiClient(cfg))
    yield _API
    server.shutdown()
    server.server_close()


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
