"""Reading what a tenant controls, within bounds the tenant cannot lift.

The operator reads ``progress.json`` from an endpoint the FineTuneJob names (``storage.endpoint``), so
the far side may be hostile: an endless body, a body of hundreds of megabytes, one byte every few
seconds (which no per-socket-read timeout ever trips), ``NaN``, nesting deep enough to exhaust the
parser's stack, a JSON array instead of an object, strings longer than a status may hold. Every read
here has a size cap (the body is streamed and the read stops past it), one deadline for the whole
exchange (connect, headers and body; a watchdog shuts the socket down when it passes, which wakes a
blocked read), and every parsed value is checked before anything else looks at it. Redirects are
never followed, so an endpoint cannot bounce the operator to an address of its choosing.

Every refusal is a :class:`TenantIOError` whose text is one short line, fit for a condition message:
it names what was wrong, never the content received.
"""

from __future__ import annotations

import http.client
import json
import math
import socket
import ssl
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

CHUNK = 64 * 1024


class TenantIOError(Exception):
    """A read refused or cut short; ``str(exc)`` is one line that says why."""


@dataclass(frozen=True)
class Limits:
    """Bounds of one read. The defaults hold a progress document with room to spare (a few KiB)."""

    deadline: float = 5.0  # seconds for the whole read: connect, request, headers and body
    max_bytes: int = 1 << 20  # body size cap
    max_string: int = 2048  # characters of any string or key, before anything reaches status
    max_depth: int = 16  # nesting of objects and arrays


@dataclass(frozen=True)
class Response:
    status: int
    headers: Mapping[str, str]  # lower-case names
    body: bytes


class _Watchdog:
    """Shuts a connection's socket down at the deadline: a read blocked in another thread wakes up
    with an error, whatever the far side does (a drip of one byte every 2 s included)."""

    def __init__(self, conn: http.client.HTTPConnection, seconds: float):
        self.conn = conn
        self.fired = threading.Event()
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True
        self._timer.start()

    def _fire(self) -> None:
        self.fired.set()  # before looking at the socket: see bounded_get's check after connect()
        sock = self.conn.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cancel(self) -> None:
        self._timer.cancel()


def bounded_get(url: str, headers: Mapping[str, str], limits: Limits, tls: ssl.SSLContext | None = None) -> Response:
    """``GET url`` within ``limits`` (size and total time); the body of any status is capped the same way.
    ``tls`` verifies https endpoints (default: the system's CAs, hostname checked)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise TenantIOError(f"refusing to read a {parts.scheme or 'relative'} URL: only http and https endpoints are read")
    conn: http.client.HTTPConnection
    if parts.scheme == "https":
        conn = http.client.HTTPSConnection(parts.hostname, parts.port, timeout=limits.deadline, context=tls or ssl.create_default_context())
    else:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=limits.deadline)
    watchdog = _Watchdog(conn, limits.deadline)
    try:
        conn.connect()
        if watchdog.fired.is_set():  # the deadline passed while connecting, before the socket existed
            raise TimeoutError
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        conn.request("GET", target, headers=dict(headers))
        resp = conn.getresponse()
        body = _read_capped(resp, limits.max_bytes)
        if watchdog.fired.is_set():  # a body cut short by the shutdown reads as a short body, not an error
            raise TimeoutError
        return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, body)
    except TenantIOError:
        raise
    except (OSError, http.client.HTTPException, ValueError) as exc:
        if watchdog.fired.is_set() or isinstance(exc, TimeoutError):
            raise TenantIOError(f"no complete answer within the {limits.deadline:g}s deadline") from None
        if isinstance(exc, ssl.SSLCertVerificationError):
            raise TenantIOError("the endpoint's TLS certificate is not trusted (SSLCertVerificationError): for a private CA, "
                                "give the operator its bundle in AWS_CA_BUNDLE (chart value extraEnv)") from None
        raise TenantIOError(f"the endpoint could not be read ({type(exc).__name__})") from None
    finally:
        watchdog.cancel()
        conn.close()


def _read_capped(resp: http.client.HTTPResponse, max_bytes: int) -> bytes:
    """The body, streamed, refused as soon as it passes ``max_bytes`` (an endless body included)."""
    declared = resp.getheader("content-length", "")
    if declared.strip().isdigit() and int(declared) > max_bytes:
        raise TenantIOError(f"the document is {int(declared)} bytes, over the {max_bytes}-byte cap")
    chunks: list[bytes] = []
    total = 0
    while chunk := resp.read(min(CHUNK, max_bytes + 1 - total)):
        chunks.append(chunk)
        total += len(chunk)
        if total > max_bytes:
            raise TenantIOError(f"the document is over the {max_bytes}-byte cap (stopped reading there)")
    if declared.strip().isdigit() and total < int(declared):
        raise OSError("the body ended before its Content-Length")  # a deadline, or the endpoint hung up
    return b"".join(chunks)


# --------------------------------------------------------------------------------------- JSON


def _refuse_constant(name: str) -> Any:
    raise TenantIOError(f"the document holds {name}, which JSON does not allow")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise TenantIOError(f"the document holds a number out of range ({text[:40]})")
    return value


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > 18:  # beyond int64: no status field can hold it
        raise TenantIOError(f"the document holds an integer of {len(text)} digits, out of range")
    return int(text)


def parse_object(raw: bytes, limits: Limits) -> dict[str, Any]:
    """``raw`` as one JSON object, or TenantIOError: not UTF-8, not JSON, NaN/Infinity or a number
    out of range, nested deeper than ``limits.max_depth``, a string or key longer than
    ``limits.max_string``, or any top-level value other than an object."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise TenantIOError("the document is not UTF-8 text") from None
    try:
        value = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float, parse_int=_bounded_int)
    except RecursionError:
        raise TenantIOError("the document is nested too deeply to parse") from None
    except json.JSONDecodeError as exc:  # its message gives a position, never the content
        raise TenantIOError(f"the document is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    if not isinstance(value, dict):
        raise TenantIOError(f"the document must hold a JSON object, not {_kind(value)}")
    check_shape(value, limits)
    return value


def _kind(value: Any) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}.get(type(value), "null")


def check_shape(value: Any, limits: Limits) -> None:
    """Depth and string lengths of a parsed value, walked without recursion (so depth costs no stack)."""
    stack: list[tuple[Any, int, str]] = [(value, 0, "$")]
    while stack:
        item, depth, full_path = stack.pop()
        path = full_path if len(full_path) <= 120 else full_path[:117] + "..."
        if isinstance(item, (dict, list)) and depth >= limits.max_depth:
            raise TenantIOError(f"the document is nested deeper than {limits.max_depth} levels at {path}")
        if isinstance(item, dict):
            for key, child in item.items():
                if len(key) > limits.max_string:
                    raise TenantIOError(f"the document has a key of {len(key)} characters in {path}, over the {limits.max_string}-character cap")
                stack.append((child, depth + 1, f"{full_path}.{key}"))
        elif isinstance(item, list):
            stack.extend((child, depth + 1, f"{full_path}[{i}]") for i, child in enumerate(item))
        elif isinstance(item, str) and len(item) > limits.max_string:
            raise TenantIOError(f"the document has a string of {len(item)} characters at {path}, over the {limits.max_string}-character cap")


INT64 = 2**63


def check_numbers(value: Any) -> None:
    """Every float finite and every int within int64, anywhere in ``value`` (a validated model's dump:
    a schema coerces strings such as ``"NaN"`` into floats, which a status patch cannot carry)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif isinstance(item, float) and not math.isfinite(item):
            raise TenantIOError("the document holds a number that is NaN or infinite")
        elif isinstance(item, int) and not isinstance(item, bool) and not -INT64 <= item < INT64:
            raise TenantIOError("the document holds an integer out of range")
