"""A loopback stand-in for kube-apiserver that ``finetune_operator.kube`` talks to, for the tests of its calls."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from kubernetes import client

from finetune_operator import kube


class JsonHandler(BaseHTTPRequestHandler):
    """A quiet handler whose answers are JSON documents."""

    def log_message(self, *args: object) -> None:
        pass

    def send_json(self, status: int, doc: dict[str, Any]) -> None:
        body = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@contextmanager
def serving(handler: type[BaseHTTPRequestHandler], monkeypatch: pytest.MonkeyPatch) -> Iterator[ThreadingHTTPServer]:
    """Serve ``handler`` on a loopback port with ``kube``'s API client pointed at it."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    cfg = client.Configuration()
    cfg.host = f"http://127.0.0.1:{server.server_port}"
    monkeypatch.setattr(kube, "_api", client.ApiClient(cfg))
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
