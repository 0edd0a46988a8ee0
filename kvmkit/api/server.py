"""A Unix socket server for the control API: one thread accepting, one per client.

Its clients are untrusted (anyone who can open the 0600 socket, i.e. its owner, but
perhaps a buggy or hostile program of theirs), so every resource a client can make
the server spend is bounded:

- a request line is at most MAX_REQUEST_BYTES: it is read in pieces and refused
  ("request too long") once longer, and the connection closed; nothing larger is
  ever buffered. Deeply nested JSON is an error reply, not a RecursionError.
- at most `max_clients` connections are served at once (MAX_CLIENTS, fewer under a
  low RLIMIT_NOFILE, leaving FD_RESERVE descriptors for the machine's own work). A
  newcomer over the cap closes the connection that has been idle longest (no
  request in flight, idle at least EVICT_IDLE_S); if there is none it is refused
  with {"ok": false, "retry": true, ...}, which `client.call` retries.
- a connection silent for IDLE_TIMEOUT_S, or not reading its answer for as long,
  is closed.
- a failed accept() (EMFILE: out of descriptors) never ends the server: a spare
  descriptor is given up to accept and refuse the waiting client in one line, and
  the server keeps accepting.
- a client hanging up at any point (ECONNRESET, EPIPE) ends its connection quietly;
  a long command it asked for (snapshot, migrate) sees ClientGone and is cancelled.
"""

import contextlib
import errno
import json
import os
import resource
import select
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from kvmkit.api.commands import handle
from kvmkit.errors import ConfigError, KvmkitError
from kvmkit.machine.machine import Machine
from kvmkit.unix_socket import claim_unix_path

MAX_REQUEST_BYTES = 1 << 16
MAX_CLIENTS = 256
FD_RESERVE = 24  # descriptors kept for snapshots, migrations and the machine itself
LISTEN_BACKLOG = 1024  # the kernel caps it at net.core.somaxconn
IDLE_TIMEOUT_S = 120.0
EVICT_IDLE_S = 1.0
ACCEPT_RETRY_S = 0.05
REPLY_GRACE_S = 5.0
READ_PIECE = 1 << 16
SUN_PATH_MAX = 108  # sockaddr_un's sun_path, with its NUL
OUT_OF_FDS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class ClientGone(KvmkitError):
    """The client of a long command (one that sends progress) disconnected: the
    command stops as if it had failed, and puts things back as they were."""


class RequestTooLong(Exception):
    pass


def client_cap() -> int:
    """How many clients may be connected at once, given this process's fd limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_CLIENTS
    try:
        in_use = len(os.listdir("/proc/self/fd"))
    except OSError:
        in_use = 32
    return max(2, min(MAX_CLIENTS, soft - in_use - FD_RESERVE))


def _spare_fd() -> int | None:
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


def _refuse(conn: socket.socket, error: str, retry: bool = False) -> None:
    """One line to a client that is not served, without waiting on it."""
    reply: dict[str, Any] = {"ok": False, "error": error}
    if retry:
        reply["retry"] = True
    with contextlib.suppress(OSError):
        conn.setblocking(False)
        conn.send(json.dumps(reply).encode() + b"\n")
    conn.close()


class _Client:
    """One connection: its socket and whether a request of it is in flight."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.busy = False
        self.last_active = time.monotonic()
        self.evicted = False

    def hung_up(self) -> bool:
        """Whether the peer closed the connection (checked without reading). A peer
        that only shut down its sending side (socat after its input ends) is still
        there to read the answer."""
        p = select.poll()
        p.register(self.conn, select.POLLHUP | select.POLLERR)
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


class ApiServer:
    """Listens at `path` (created with mode 0600) until `close()`."""

    def __init__(self, path: str | os.PathLike[str], machine: Machine) -> None:
        self.path = Path(path)
        self.machine = machine
        claim_unix_path(self.path, "the API socket")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        # Bound and listening under a hidden name, then renamed into place: a client
        # that sees the path can connect (no ECONNREFUSED window between bind and
        # listen).
        hidden = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        if len(os.fsencode(hidden)) >= SUN_PATH_MAX:  # no room for it: bind in place
            hidden = self.path
        old_umask = os.umask(0o177)
        try:
            hidden.unlink(missing_ok=True)
            self.sock.bind(str(hidden))
            os.chmod(hidden, 0o600)
            self.sock.listen(LISTEN_BACKLOG)
            if hidden != self.path:
                os.rename(hidden, self.path)
        except OSError as e:
            self.sock.close()
            with contextlib.suppress(OSError):
                hidden.unlink()
            raise ConfigError(f"cannot create the API socket {self.path}: {e.strerror}") from None
        finally:
            os.umask(old_umask)
        self.max_clients = client_cap()
        self.refused = 0  # connections refused (over the cap, out of descriptors)
        self._spare = _spare_fd()
        self._closed = threading.Event()
        self._clients: set[_Client] = set()
        self._busy = 0  # requests being handled or answered
        self._idle = threading.Condition()
        self._thread = threading.Thread(target=self._accept, name="kvmkit-api", daemon=True)

    def start(self) -> "ApiServer":
        self._thread.start()
        return self

    # -- accepting -------------------------------------------------------------------------
    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError as e:
                if self._closed.is_set():
                    return
                if e.errno in OUT_OF_FDS:
                    self._shed()
                    self._closed.wait(ACCEPT_RETRY_S)
                    continue
                if e.errno in (errno.ECONNABORTED, errno.EINTR, errno.EPROTO):
                    continue
                _log(f"the control API stopped accepting: {e}")
                return
            self._admit(conn)

    def _shed(self) -> None:
        """Out of descriptors: use the spare one to take the waiting client and tell it
        so, instead of leaving it hanging (or ending the server)."""
        if self._spare is not None:
            os.close(self._spare)
            self._spare = None
        self.sock.setblocking(False)
        try:
            conn, _ = self.sock.accept()
        except OSError:
            conn = None
        finally:
            self.sock.setblocking(True)
        if conn is not None:
            self.refused += 1
            _refuse(
                conn,
                "kvmkit is out of file descriptors (too many open connections or files):"
                " try again once some are closed",
                retry=True,
            )
        self._spare = _spare_fd()

    def _admit(self, conn: socket.socket) -> None:
        with self._idle:
            if len(self._clients) >= self.max_clients and not self._evict_one():
                self.refused += 1
                _refuse(
                    conn,
                    f"the control API is busy ({len(self._clients)} connections, the most it"
                    " serves at once): try again",
                    retry=True,
                )
                return
            client = _Client(conn)
            self._clients.add(client)
        try:
            threading.Thread(
                target=self._serve, args=(client,), name="kvmkit-api-client", daemon=True
            ).start()
        except RuntimeError:  # no thread to be had
            self._forget(client)
            _refuse(conn, "kvmkit cannot start a thread for this connection: try again", True)

    def _evict_one(self) -> bool:
        """Close the connection idle longest (none of its requests in flight), if one
        has been idle EVICT_IDLE_S. Called with `_idle` held."""
        now = time.monotonic()
        idle = [c for c in self._clients if not c.busy and not c.evicted]
        if not idle:
            return False
        oldest = min(idle, key=lambda c: c.last_active)
        if now - oldest.last_active < EVICT_IDLE_S:
            return False
        oldest.evicted = True
        self._clients.discard(oldest)
        with contextlib.suppress(OSError):
            oldest.conn.shutdown(socket.SHUT_RDWR)  # its thread sees the end and closes it
        return True

    def _forget(self, client: _Client) -> None:
        with self._idle:
            self._clients.discard(client)

    # -- serving one client ------------------------------------------------------------------
    def _serve(self, client: _Client) -> None:
        conn = client.conn
        try:
            conn.settimeout(IDLE_TIMEOUT_S)
            reader = _LineReader(conn)
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
        except OSError:  # the client hung up, reset, or went silent: nothing to tell
            pass
        except Exception as e:  # a kvmkit bug: one line where the VM runs, never a traceback
            _log(f"control API: internal error serving a client: {type(e).__name__}: {e}")
        finally:
            self._forget(client)
            conn.close()

    def _request(self, client: _Client, line: bytes) -> bool:
        """Handle one request line; False when the connection is over."""
        conn = client.conn
        with self._idle:
            self._busy += 1
            client.busy = True
        try:
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
                    if client.hung_up():
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
        finally:
            with self._idle:
                self._busy -= 1
                client.busy = False
                client.last_active = time.monotonic()
                self._idle.notify_all()

    @staticmethod
    def _answer(conn: socket.socket, reply: dict[str, Any]) -> bool:
        try:
            conn.sendall(json.dumps(reply).encode() + b"\n")
        except OSError:
            return False
        return True

    # -- closing -----------------------------------------------------------------------------
    def close(self) -> None:
        """Stop listening. A request that ended the machine (stop, a migration) is still
        answered: wait up to REPLY_GRACE_S for the answers in flight; idle connections
        are closed."""
        self._closed.set()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        with self._idle:
            self._idle.wait_for(lambda: self._busy == 0, REPLY_GRACE_S)
            for client in list(self._clients):
                if not client.busy:
                    with contextlib.suppress(OSError):
                        client.conn.shutdown(socket.SHUT_RDWR)
        if self._thread.is_alive():
            self._thread.join(1.0)
        self.sock.close()
        if self._spare is not None:
            os.close(self._spare)
            self._spare = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def _log(message: str) -> None:
    with contextlib.suppress(OSError, ValueError):
        print(f"kvmkit: {message}", file=sys.stderr, flush=True)
