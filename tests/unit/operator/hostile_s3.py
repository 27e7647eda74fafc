"""A hostile S3-compatible endpoint on loopback: what a tenant's ``storage.endpoint`` may answer.

The bucket of a path-style GET picks the behaviour (``/<bucket>/<key>``). Every request is recorded
(path, query, headers), so a test can also check what the operator sent: credentials, conditional
headers, and that nothing was fetched that should not have been.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

GOOD = {"stage": "training", "step": 0, "totalSteps": 400, "epoch": 0.5, "trainLoss": 0.5}
CHUNK = b"x" * 65536


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "HostileS3"

    def log_message(self, *args: object) -> None:  # quiet
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        parts = urlsplit(self.path)
        bucket = parts.path.lstrip("/").split("/", 1)[0]
        self.server.record(bucket, parts, dict(self.headers))
        getattr(self, "_" + bucket.replace("-", "_"), self._not_found)()

    # ------------------------------------------------------------------------------- behaviours

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _not_found(self) -> None:
        self._send(404, b"<Error><Code>NoSuchKey</Code></Error>")

    def _good(self) -> None:
        """A well-behaved store: a document whose step rises on every read, ETag and 304."""
        step = self.server.good_reads
        self.server.good_reads += 1
        etag = f'"{step}"'
        if self.headers.get("If-None-Match") == etag:
            self._send(304, b"")
            return
        self._send(200, json.dumps({**GOOD, "step": step}).encode(), {"ETag": etag})

    def _stable(self) -> None:
        """Always the same document and ETag: the second read must be a 304."""
        if self.headers.get("If-None-Match") == '"v1"':
            self.send_response(304)
            self.send_header("ETag", '"v1"')
            self.end_headers()
            return
        self._send(200, json.dumps({**GOOD, "step": 7}).encode(), {"ETag": '"v1"'})

    def _chunked(self, total: int | None) -> None:
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        sent = 0
        try:
            while total is None or sent < total:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(CHUNK), CHUNK))
                sent += len(CHUNK)
            self.wfile.write(b"0\r\n\r\n")
        except OSError:  # the reader hung up: what it should do
            self.server.hung_up += 1

    def _endless(self) -> None:
        self._chunked(None)

    def _big_chunked(self) -> None:
        self._chunked(200 * 1024 * 1024)

    def _big(self) -> None:
        """200 MB with an honest Content-Length."""
        self.send_response(200)
        self.send_header("Content-Length", str(200 * 1024 * 1024))
        self.end_headers()
        try:
            for _ in range(200 * 16):
                self.wfile.write(CHUNK)
        except OSError:
            self.server.hung_up += 1

    def _drip(self) -> None:
        """A valid-looking response, one byte every 2 s: no per-read timeout ever fires."""
        body = json.dumps(GOOD).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.flush()
        self._drip_bytes(body)

    def _drip_headers(self) -> None:
        """The status line and then the headers, one byte every 2 s."""
        self._drip_bytes(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Padding: " + b"a" * 1000)

    def _drip_bytes(self, data: bytes) -> None:
        try:
            for i in range(len(data)):
                self.wfile.write(data[i:i + 1])
                self.wfile.flush()
                time.sleep(2)
        except OSError:
            self.server.hung_up += 1

    def _nan(self) -> None:
        self._send(200, b'{"stage": "training", "step": 3, "trainLoss": NaN}')

    def _infinity(self) -> None:
        self._send(200, b'{"stage": "training", "step": 3, "evalLoss": 1e999}')

    def _nan_string(self) -> None:
        self._send(200, b'{"stage": "training", "step": 3, "trainLoss": "NaN"}')

    def _huge_int(self) -> None:
        self._send(200, b'{"stage": "training", "step": "' + b"9" * 30 + b'"}')

    def _deep(self) -> None:
        self._send(200, b'{"evaluation": {"baseline": ' + b'{"a": ' * 50_000 + b"1" + b"}" * 50_001 + b"}")

    def _nested(self) -> None:
        """Deep enough to refuse (40 levels), shallow enough for the JSON parser's own stack."""
        self._send(200, b'{"evaluation": {"baseline": ' + b'{"a": ' * 40 + b"1" + b"}" * 41 + b"}")

    def _deep_array(self) -> None:
        self._send(200, b"[" * 500_000 + b"]" * 500_000)

    def _array(self) -> None:
        self._send(200, json.dumps([GOOD, GOOD]).encode())

    def _long_string(self) -> None:
        self._send(200, json.dumps({**GOOD, "stage": "s" * 100_000}).encode())

    def _wrong_type(self) -> None:
        self._send(200, json.dumps({**GOOD, "step": {"secret": "do-not-echo"}}).encode())

    def _redirect(self) -> None:
        self._send(302, b"", {"Location": f"http://127.0.0.1:{self.server.server_port}/creds/latest"})

    def _creds(self) -> None:
        """Where ambient credentials would come from (container credentials / metadata)."""
        self._send(200, json.dumps({"AccessKeyId": "AMBIENT", "SecretAccessKey": "AMBIENTSECRET", "Token": "T",
                                    "Expiration": "2999-01-01T00:00:00Z"}).encode())


class HostileS3(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[tuple[str, dict[str, list[str]], dict[str, str]]] = []
        self.good_reads = 0
        self.hung_up = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_port}"

    def record(self, bucket: str, parts: object, headers: dict[str, str]) -> None:
        with self._lock:
            self.requests.append((bucket, parse_qs(parts.query), headers))  # type: ignore[attr-defined]

    def seen(self, bucket: str) -> list[tuple[str, dict[str, list[str]], dict[str, str]]]:
        with self._lock:
            return [r for r in self.requests if r[0] == bucket]

    def __enter__(self) -> "HostileS3":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.server_close()
