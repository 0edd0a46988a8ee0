"""`UnixListener`: the socket, accept loop and client bookkeeping both API servers share
(kvmkit's JSON-line API in server.py, Firecracker's HTTP API in http.py).

Its clients are untrusted (anyone who can open the 0600 socket: its owner, but perhaps
a buggy or hostile program of theirs), so what a client can make it spend is bounded:

- the socket is bound and listening under a hidden name, then renamed into place: a
  client that waits for the path to appear (as Firecracker's SDKs do) connects at once,
  with no ECONNREFUSED window between bind and listen.
- at most `max_clients` connections are served at once (fewer under a low
  RLIMIT_NOFILE, leaving FD_RESERVE descriptors for the machine's own work). A newcomer
  over the cap closes the connection idle longest (between requests, and idle at least
  `evict_after_s`); if there is none it gets the protocol's "busy, try again" answer.
- a failed accept() (EMFILE: out of descriptors) never ends the server: a spare
  descriptor is given up to accept and refuse the waiting client, and accepting goes on.
- no thread for a connection (RuntimeError) refuses that client, nothing else.
- `close()` stops accepting, waits up to REPLY_GRACE_S for the requests in flight (one
  may have ended the machine: its client still gets the answer), then closes the idle
  connections and removes the socket file.

A subclass defines `serve(client)` (the protocol on one connection; it marks each
request with `handling(client)`) and `refuse(conn, message)` (one answer to a client
that is not served, without waiting on it).
"""

import contextlib
import errno
import os
import resource
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Self

from kvmkit.errors import ConfigError
from kvmkit.unix_socket import claim_unix_path

FD_RESERVE = 24  # descriptors kept for snapshots, migrations and the machine itself
LISTEN_BACKLOG = 1024  # the kernel caps it at net.core.somaxconn
ACCEPT_RETRY_S = 0.05
REPLY_GRACE_S = 5.0
SUN_PATH_MAX = 108  # sockaddr_un's sun_path, with its NUL
OUT_OF_FDS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
TRANSIENT = (errno.ECONNABORTED, errno.EINTR, errno.EPROTO)


def client_cap(most: int) -> int:
    """How many clients may be connected at once (at most `most`), given this process's
    descriptor limit and the descriptors already open."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return most
    try:
        in_use = len(os.listdir("/proc/self/fd"))
    except OSError:
        in_use = 32
    return max(2, min(most, soft - in_use - FD_RESERVE))


class Client:
    """One connection: its socket, whether it is in the middle of a request (then it is
    never evicted) and whether that request is being handled (then `close()` lets it
    answer)."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.busy = False
        self.handling = False
        self.last_active = time.monotonic()
        self.evicted = False


class UnixListener:
    """Listens at `path` (mode 0600) until `close()`. `what` names the socket in errors
    ("the API socket"), `name` the service in messages ("the control API")."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        what: str,
        name: str,
        max_clients: int,
        evict_after_s: float,
        thread_name: str,
    ) -> None:
        self.path = Path(path)
        self.what = what
        self.name = name
        claim_unix_path(self.path, what)
        self.sock = _listen(self.path, what)
        self.max_clients = client_cap(max_clients)
        self.evict_after_s = evict_after_s
        self.refused = 0  # connections refused (over the cap, out of descriptors)
        self._spare = _spare_fd()
        self._closed = threading.Event()
        self._clients: set[Client] = set()
        self._busy = 0  # requests being handled or answered
        self._idle = threading.Condition()
        self._thread_name = thread_name
        self._thread = threading.Thread(target=self._accept, name=thread_name, daemon=True)

    # -- what a subclass defines ---------------------------------------------------------
    def serve(self, client: Client) -> None:
        """Serve one connection until it ends (the listener closes it afterwards)."""
        raise NotImplementedError

    def refuse(self, conn: socket.socket, message: str) -> None:
        """Tell a client that is not served `message` ("try again"), without waiting."""
        raise NotImplementedError

    # -- for serve() ---------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def reading(self, client: Client) -> None:
        """The client has begun a request: it is not idle any more (never evicted)."""
        with self._idle:
            client.busy = True

    @contextlib.contextmanager
    def handling(self, client: Client) -> Iterator[None]:
        """Around the handling and answering of one request: `close()` waits for it."""
        with self._idle:
            self._busy += 1
            client.busy = client.handling = True
        try:
            yield
        finally:
            with self._idle:
                self._busy -= 1
                client.busy = client.handling = False
                client.last_active = time.monotonic()
                self._idle.notify_all()

    # -- accepting -----------------------------------------------------------------------
    def start(self) -> Self:
        self._thread.start()
        return self

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
                if e.errno in TRANSIENT:
                    continue
                log(f"{self.name} stopped accepting: {e}")
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
            self.refuse(
                conn,
                "kvmkit is out of file descriptors (too many open connections or files):"
                " try again once some are closed",
            )
        self._spare = _spare_fd()

    def _admit(self, conn: socket.socket) -> None:
        with self._idle:
            if len(self._clients) >= self.max_clients and not self._evict_one():
                self.refused += 1
                self.refuse(
                    conn,
                    f"{self.name} is busy ({len(self._clients)} connections, the most it"
                    " serves at once): try again",
                )
                return
            client = Client(conn)
            self._clients.add(client)
        try:
            threading.Thread(
                target=self._run, args=(client,), name=f"{self._thread_name}-client", daemon=True
            ).start()
        except RuntimeError:  # no thread to be had
            self._forget(client)
            self.refuse(conn, "kvmkit cannot start a thread for this connection: try again")

    def _evict_one(self) -> bool:
        """Close the connection idle longest, if one has been idle `evict_after_s`.
        Called with `_idle` held."""
        idle = [c for c in self._clients if not c.busy and not c.evicted]
        if not idle:
            return False
        oldest = min(idle, key=lambda c: c.last_active)
        if time.monotonic() - oldest.last_active < self.evict_after_s:
            return False
        oldest.evicted = True
        self._clients.discard(oldest)
        with contextlib.suppress(OSError):
            oldest.conn.shutdown(socket.SHUT_RDWR)  # its thread sees the end and closes it
        return True

    def _forget(self, client: Client) -> None:
        with self._idle:
            self._clients.discard(client)

    def _run(self, client: Client) -> None:
        try:
            self.serve(client)
        except OSError:  # the client hung up, reset, or went silent: nothing to tell
            pass
        except Exception as e:  # a kvmkit bug: one line where the VM runs, never a traceback
            log(f"{self.name}: internal error serving a client: {type(e).__name__}: {e}")
        finally:
            self._forget(client)
            client.conn.close()

    # -- closing -------------------------------------------------------------------------
    def close(self) -> None:
        """Stop listening; wait up to REPLY_GRACE_S for the answers in flight; close the
        other connections (idle, or still sending a request); remove the socket file."""
        self._closed.set()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        with self._idle:
            self._idle.wait_for(lambda: self._busy == 0, REPLY_GRACE_S)
            for client in list(self._clients):
                if not client.handling:
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


def _listen(path: Path, what: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    hidden = path.with_name(f".{path.name}.{os.getpid()}")
    if len(os.fsencode(hidden)) >= SUN_PATH_MAX:  # no room for it: bind in place
        hidden = path
    old_umask = os.umask(0o177)
    try:
        hidden.unlink(missing_ok=True)
        sock.bind(str(hidden))
        os.chmod(hidden, 0o600)
        sock.listen(LISTEN_BACKLOG)
        if hidden != path:
            os.rename(hidden, path)
    except OSError as e:
        sock.close()
        with contextlib.suppress(OSError):
            hidden.unlink()
        raise ConfigError(f"cannot create {what} {path}: {e.strerror or e}") from None
    finally:
        os.umask(old_umask)
    return sock


def _spare_fd() -> int | None:
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


def log(message: str) -> None:
    """One line on stderr, where the VM runs (never raising: stderr may be gone)."""
    with contextlib.suppress(OSError, ValueError):
        print(f"kvmkit: {message}", file=sys.stderr, flush=True)
