"""A Unix socket server for the control API: one thread accepting, one per client."""

import contextlib
import json
import os
import socket
import threading
from pathlib import Path
from typing import Any

from kvmkit.api.commands import handle
from kvmkit.errors import ConfigError, KvmkitError
from kvmkit.machine.machine import Machine
from kvmkit.unix_socket import claim_unix_path

MAX_REQUEST_BYTES = 1 << 16
REPLY_GRACE_S = 5.0


class ClientGone(KvmkitError):
    """The client of a long command (one that sends progress) disconnected: the
    command stops as if it had failed, and puts things back as they were."""


class ApiServer:
    """Listens at `path` (created with mode 0600) until `close()`."""

    def __init__(self, path: str | os.PathLike[str], machine: Machine) -> None:
        self.path = Path(path)
        self.machine = machine
        claim_unix_path(self.path, "the API socket")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old_umask = os.umask(0o177)
        try:
            self.sock.bind(str(self.path))
        except OSError as e:
            self.sock.close()
            raise ConfigError(f"cannot create the API socket {self.path}: {e.strerror}") from None
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o600)
        self.sock.listen(8)
        self._closed = threading.Event()
        self._busy = 0  # requests being handled or answered
        self._idle = threading.Condition()
        self._thread = threading.Thread(target=self._accept, name="kvmkit-api", daemon=True)

    def start(self) -> "ApiServer":
        self._thread.start()
        return self

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as rfile:
            for line in rfile:
                if len(line) > MAX_REQUEST_BYTES:
                    reply: dict[str, Any] = {"ok": False, "error": "request too long"}
                    self._answer(conn, reply)
                    continue
                with self._idle:
                    self._busy += 1
                try:
                    try:
                        request = json.loads(line)
                    except ValueError as e:
                        reply = {"ok": False, "error": f"not JSON: {e}"}
                    else:

                        def emit(event: dict[str, Any], conn: socket.socket = conn) -> None:
                            try:
                                conn.sendall(json.dumps({"event": event}).encode() + b"\n")
                            except OSError:  # the caller went away (Ctrl-C): stop the work
                                raise ClientGone(
                                    "the client that asked for it went away (cancelled)"
                                ) from None

                        reply = handle(self.machine, request, emit)
                    if not self._answer(conn, reply):
                        return
                finally:
                    with self._idle:
                        self._busy -= 1
                        self._idle.notify_all()

    @staticmethod
    def _answer(conn: socket.socket, reply: dict[str, Any]) -> bool:
        try:
            conn.sendall(json.dumps(reply).encode() + b"\n")
        except OSError:
            return False
        return True

    def close(self) -> None:
        """Stop listening. A request that ended the machine (stop, a migration) is still
        answered: wait up to REPLY_GRACE_S for the answers in flight."""
        self._closed.set()
        with self._idle:
            self._idle.wait_for(lambda: self._busy == 0, REPLY_GRACE_S)
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
