"""kvmkit's control API on a Unix socket: one JSON request per line, one JSON answer
(and, for long commands, progress events) per request. The socket, the client cap,
eviction, running out of descriptors and closing are `UnixListener`'s (listener.py);
here is the protocol, bounded like the rest:

- a request line is at most MAX_REQUEST_BYTES: it is read in pieces and refused
  ("request too long") once longer, and the connection closed; nothing larger is
  ever buffered. Deeply nested JSON is an error reply, not a RecursionError.
- a client refused (over the cap, out of descriptors) gets {"ok": false, "retry": true,
  ...}, which `client.call` retries; a newcomer over the cap closes a connection idle
  at least EVICT_IDLE_S.
- a connection silent for IDLE_TIMEOUT_S, or not reading its answer for as long,
  is closed.
- a client hanging up at any point (ECONNRESET, EPIPE) ends its connection quietly;
  a long command it asked for (snapshot, migrate) sees ClientGone and is cancelled.
"""

import contextlib
import json
import os
import select
import socket
from typing import Any

from kvmkit.api.commands import handle
from kvmkit.api.listener import Client, UnixListener
from kvmkit.errors import KvmkitError
from kvmkit.machine.machine import Machine

MAX_REQUEST_BYTES = 1 << 16
MAX_CLIENTS = 256
IDLE_TIMEOUT_S = 120.0
EVICT_IDLE_S = 1.0
READ_PIECE = 1 << 16


class ClientGone(KvmkitError):
    """The client of a long command (one that sends progress) disconnected: the
    command stops as if it had failed, and puts things back as they were."""


class RequestTooLong(Exception):
    pass


def _hung_up(conn: socket.socket) -> bool:
    """Whether the peer closed the connection (checked without reading). A peer that
    only shut down its sending side (socat after its input ends) is still there to read
    the answer."""
    p = select.poll()
    p.register(conn, select.POLLHUP | select.POLLERR)
    try:
        return bool(p.poll(0))
    except OSError:
        return True


class _LineReader:
    """Request lines from a socket, never buffering more than MAX_REQUEST_BYTES plus
    one piece."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.buffer = bytearray()
        self.searched = 0

    def next_line(self) -> bytes | None:
        """The next line (without its newline); None at the end of the stream."""
        while True:
            end = self.buffer.find(b"\n", self.searched)
            if end >= 0:
                line = bytes(self.buffer[:end])
                del self.buffer[: end + 1]
                self.searched = 0
                if len(line) > MAX_REQUEST_BYTES:
                    raise RequestTooLong
                return line
            self.searched = len(self.buffer)
            if len(self.buffer) > MAX_REQUEST_BYTES:
                raise RequestTooLong
            piece = self.conn.recv(READ_PIECE)
            if not piece:
                return None
            self.buffer += piece


class ApiServer(UnixListener):
    """Listens at `path` (created with mode 0600) until `close()`."""

    def __init__(self, path: str | os.PathLike[str], machine: Machine) -> None:
        super().__init__(
            path, "the API socket", "the control API", MAX_CLIENTS, EVICT_IDLE_S, "kvmkit-api"
        )
        self.machine = machine

    def refuse(self, conn: socket.socket, message: str) -> None:
        """One line to a client that is not served, without waiting on it."""
        reply = {"ok": False, "error": message, "retry": True}
        with contextlib.suppress(OSError):
            conn.setblocking(False)
            conn.send(json.dumps(reply).encode() + b"\n")
        conn.close()

    def serve(self, client: Client) -> None:
        conn = client.conn
        conn.settimeout(IDLE_TIMEOUT_S)
        reader = _LineReader(conn)
        try:
            while (line := reader.next_line()) is not None:
                if not self._request(client, line):
                    return
        except RequestTooLong:
            self._answer(
                conn,
                {
                    "ok": False,
                    "error": f"request too long: a request is one line of at most"
                    f" {MAX_REQUEST_BYTES} bytes; closing the connection",
                },
            )

    def _request(self, client: Client, line: bytes) -> bool:
        """Handle one request line; False when the connection is over."""
        conn = client.conn
        with self.handling(client):
            try:
                request = json.loads(line)
            except RecursionError:
                reply: dict[str, Any] = {
                    "ok": False,
                    "error": "not JSON kvmkit takes: nested too deeply",
                }
            except ValueError as e:
                reply = {"ok": False, "error": f"not JSON: {e}"}
            else:

                def emit(event: dict[str, Any]) -> None:
                    if _hung_up(conn):
                        raise ClientGone("the client that asked for it went away (cancelled)")
                    if not event:
                        return
                    try:
                        conn.sendall(json.dumps({"event": event}).encode() + b"\n")
                    except OSError:  # the caller went away (Ctrl-C): stop the work
                        raise ClientGone(
                            "the client that asked for it went away (cancelled)"
                        ) from None

                reply = handle(self.machine, request, emit)
            return self._answer(conn, reply)

    @staticmethod
    def _answer(conn: socket.socket, reply: dict[str, Any]) -> bool:
        try:
            conn.sendall(json.dumps(reply).encode() + b"\n")
        except OSError:
            return False
        return True
