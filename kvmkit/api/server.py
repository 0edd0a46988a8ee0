"""A Unix socket server for the control API: one thread accepting, one per client."""

import contextlib
import json
import os
import socket
import stat
import threading
from pathlib import Path
from typing import Any

from kvmkit.api.commands import Controllable, handle
from kvmkit.errors import ConfigError

MAX_REQUEST_BYTES = 1 << 16


class ApiServer:
    """Listens at `path` (created with mode 0600) until `close()`."""

    def __init__(self, path: str | os.PathLike[str], machine: Controllable) -> None:
        self.path = Path(path)
        self.machine = machine
        self._claim_path()
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
        self._thread = threading.Thread(target=self._accept, name="kvmkit-api", daemon=True)

    def _claim_path(self) -> None:
        if not self.path.parent.is_dir():
            raise ConfigError(f"API socket directory {self.path.parent} does not exist")
        try:
            mode = self.path.lstat().st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(mode):
            raise ConfigError(f"{self.path} exists and is not a socket: choose another path")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(self.path))
        except OSError:
            self.path.unlink()  # a stale socket from a kvmkit that is gone
            return
        finally:
            probe.close()
        raise ConfigError(f"another process is serving {self.path}: choose another path")

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
                else:
                    try:
                        request = json.loads(line)
                    except ValueError as e:
                        reply = {"ok": False, "error": f"not JSON: {e}"}
                    else:
                        reply = handle(self.machine, request)
                try:
                    conn.sendall(json.dumps(reply).encode() + b"\n")
                except OSError:
                    return

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
