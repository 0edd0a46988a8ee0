"""A small HTTP/1.1 server on a Unix socket (mode 0600), for untrusted local clients.

One thread per client (at most MAX_CLIENTS at once), keep-alive, bodies by
Content-Length only; the socket, the client cap, running out of descriptors and
closing are `UnixListener`'s (listener.py). Every limit is checked while reading, so
no client makes the server hold more than the limit: the request line
(MAX_LINE_BYTES), the headers (MAX_HEADER_BYTES, MAX_HEADERS), the body
(MAX_BODY_BYTES, Firecracker's default payload limit). A request must arrive within
REQUEST_TIMEOUT_S of its first byte; an idle keep-alive connection is closed after
IDLE_TIMEOUT_S, or when a new client comes while MAX_CLIENTS are connected (the one
idle longest goes; a client refused gets a 503). A client that hangs up,
stalls or sends garbage costs only its own thread: it never stalls another client
or the machine, and nothing is printed for it.

The application is one function, `(Request) -> Response`; it must not raise (an
exception becomes a 500 with one line, and is never printed as a traceback).
"""

import contextlib
import json
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kvmkit.api.listener import Client, UnixListener

MAX_LINE_BYTES = 8192
MAX_HEADER_BYTES = 16384
MAX_HEADERS = 64  # each read is bounded by what the current part may still take
MAX_BODY_BYTES = 51200  # Firecracker's default http_api_max_payload_size
MAX_JSON_DEPTH = 32
MAX_CLIENTS = 32
REQUEST_TIMEOUT_S = 30.0
IDLE_TIMEOUT_S = 600.0
REASONS = {
    100: "Continue",
    200: "OK",
    204: "No Content",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    411: "Length Required",
    413: "Payload Too Large",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}


@dataclass
class Request:
    method: str
    path: str  # without the query string
    query: str
    headers: dict[str, str]  # lower-case names
    body: bytes
    version: str = "HTTP/1.1"


@dataclass
class Response:
    status: int
    body: Any = None  # JSON-serialisable, or None for no body
    headers: dict[str, str] = field(default_factory=dict)


def fault(status: int, message: str) -> Response:
    """Firecracker's error body: {"fault_message": "..."}."""
    return Response(status, {"fault_message": message})


class BadRequest(Exception):
    """The request cannot be read; answered with `status` and the connection closed."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class ClientGone(Exception):
    """The client hung up or stalled: close quietly."""


def check_json_depth(body: bytes, limit: int = MAX_JSON_DEPTH, what: str = "the JSON body") -> None:
    """Refuse JSON nested deeper than `limit` before parsing it (the parser recurses)."""
    depth = 0
    in_string = escaped = False
    for byte in body:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):
            depth += 1
            if depth > limit:
                raise BadRequest(400, f"{what} is nested deeper than {limit} levels")
        elif byte in (0x5D, 0x7D):
            depth -= 1


def parse_json(body: bytes, what: str = "the body") -> Any:
    """`body` (called `what` in messages) as JSON; BadRequest (400) naming what is wrong."""
    check_json_depth(body, what=what)
    try:
        return json.loads(body)
    except UnicodeDecodeError:
        raise BadRequest(400, f"{what} is not UTF-8 JSON") from None
    except ValueError as e:
        raise BadRequest(400, f"{what} is not valid JSON: {e}") from None


class _Reader:
    """Bounded reads from a client socket, with a deadline for the current request."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.buffer = bytearray()
        self.deadline: float | None = None  # monotonic time the request must be in by

    def _fill(self, at_most: int = 4096) -> None:
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise ClientGone()
            self.conn.settimeout(left)
        try:
            chunk = self.conn.recv(max(1, at_most))
        except OSError:  # a timeout too
            raise ClientGone() from None
        if not chunk:
            raise ClientGone()
        self.buffer += chunk

    def fill(self) -> None:
        self._fill(1)

    def line(self, limit: int, what: str) -> bytes:
        """The next line (without CR LF); never reads past `limit` + 1 bytes of it."""
        while True:
            end = self.buffer.find(b"\n", 0, limit + 1)
            if end >= 0:
                line = bytes(self.buffer[:end])
                del self.buffer[: end + 1]
                return line.rstrip(b"\r")
            if len(self.buffer) > limit:
                raise BadRequest(431 if what == "header" else 400, f"the {what} is too long")
            self._fill(limit + 1 - len(self.buffer))

    def exactly(self, n: int) -> bytes:
        """The next `n` bytes; reads no more than that."""
        while len(self.buffer) < n:
            self._fill(n - len(self.buffer))
        data = bytes(self.buffer[:n])
        del self.buffer[:n]
        return data


def _read_request(
    reader: _Reader,
    conn: socket.socket,
    started: Callable[[], None] = lambda: None,
    max_body: int = MAX_BODY_BYTES,
) -> Request | None:
    """One request; None when the client closed between requests. `started` is called
    when its first byte arrives (the connection is no longer idle)."""
    reader.deadline = None
    conn.settimeout(IDLE_TIMEOUT_S)
    try:
        while not reader.buffer:
            reader.fill()
    except ClientGone:
        return None
    started()
    reader.deadline = time.monotonic() + REQUEST_TIMEOUT_S
    line = reader.line(MAX_LINE_BYTES, "request line")
    while not line:  # tolerated empty lines between requests (RFC 9112 2.2)
        line = reader.line(MAX_LINE_BYTES, "request line")
    try:
        method, target, version = line.decode("ascii").split(" ")
    except (UnicodeDecodeError, ValueError):
        raise BadRequest(400, "the request line is not 'METHOD PATH HTTP/1.1'") from None
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        # 400, not 505: a client's mistake (kvmkit answers no 5xx for what a client sent)
        raise BadRequest(400, f"{version[:20]!r} is not HTTP/1.1: kvmkit serves HTTP/1.1")
    headers: dict[str, str] = {}
    total = 0
    while True:
        raw = reader.line(MAX_HEADER_BYTES, "header")
        if not raw:
            break
        total += len(raw)
        if total > MAX_HEADER_BYTES or len(headers) > MAX_HEADERS:
            raise BadRequest(431, "the request headers are too large")
        name, colon, value = raw.partition(b":")
        if not colon or not name or name != name.strip():
            raise BadRequest(400, "a header line is not 'Name: value'")
        try:
            headers[name.decode("ascii").lower()] = value.decode("latin-1").strip()
        except UnicodeDecodeError:
            raise BadRequest(400, "a header name is not ASCII") from None
    if "transfer-encoding" in headers:
        raise BadRequest(501, "chunked bodies are not supported: send a Content-Length")
    length_text = headers.get("content-length", "0")
    if not length_text.isdigit() or len(length_text) > 12:
        raise BadRequest(400, "Content-Length is not a number")
    length = int(length_text)
    if length > max_body:
        raise BadRequest(413, f"the body is {length} bytes: kvmkit takes at most {max_body}")
    if length and headers.get("expect", "").lower() == "100-continue":
        conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
    body = reader.exactly(length)
    path, _, query = target.partition("?")
    return Request(method, path, query, headers, body, version)


def _encode(response: Response, keep_alive: bool) -> bytes:
    if response.body is None:
        payload = b""
    else:
        payload = json.dumps(response.body).encode()
    lines = [f"HTTP/1.1 {response.status} {REASONS.get(response.status, 'Unknown')}"]
    lines.append("Server: kvmkit")
    if payload:
        lines.append("Content-Type: application/json")
    lines.append(f"Content-Length: {len(payload)}")
    if not keep_alive:
        lines.append("Connection: close")
    for name, value in response.headers.items():
        lines.append(f"{name}: {value}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + payload


App = Callable[[Request], Response]


class HttpServer(UnixListener):
    """Serves `app` at `path` until `close()`."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        app: App,
        what: str = "the API socket",
        max_body: int = MAX_BODY_BYTES,
    ) -> None:
        super().__init__(path, what, "kvmkit's HTTP API", MAX_CLIENTS, 0.0, "kvmkit-http")
        self.max_body = max_body
        self.app = app

    def refuse(self, conn: socket.socket, message: str) -> None:
        with contextlib.suppress(OSError):
            conn.setblocking(False)
            conn.send(_encode(fault(503, message), False))
        conn.close()

    def serve(self, client: Client) -> None:
        conn = client.conn
        reader = _Reader(conn)
        try:
            while not self.closed:
                try:
                    request = _read_request(
                        reader, conn, lambda: self.reading(client), self.max_body
                    )
                except BadRequest as e:
                    conn.sendall(_encode(fault(e.status, str(e)), False))
                    return
                if request is None:
                    return
                keep_alive = _wants_keep_alive(request)
                with self.handling(client):
                    try:
                        response = self.app(request)
                    except Exception as e:  # a kvmkit bug: one line to the client
                        response = fault(500, f"internal error: {type(e).__name__}: {e}")
                    conn.settimeout(REQUEST_TIMEOUT_S)
                    conn.sendall(_encode(response, keep_alive))
                if not keep_alive:
                    return
        except ClientGone:
            pass  # hung up or stalled: nothing to say to anyone


def _wants_keep_alive(request: Request) -> bool:
    connection = request.headers.get("connection", "").lower()
    if request.version == "HTTP/1.0":
        return connection == "keep-alive"
    return connection != "close"
