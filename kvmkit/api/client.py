"""Calling a running kvmkit's control API."""

import json
import socket
from collections.abc import Callable
from typing import Any

from kvmkit.errors import ConfigError, KvmkitError


class ApiCallError(KvmkitError):
    """The machine refused or failed a request; the message is its answer."""


def call(
    path: str,
    cmd: str,
    args: dict[str, Any] | None = None,
    timeout_s: float | None = 600.0,
    on_event: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Send one request (`cmd` plus `args`) to the kvmkit serving `path`; return the
    response's fields, or raise ApiCallError with the machine's answer. Progress
    events a command sends before its answer go to `on_event`."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout_s)
    try:
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            raise ConfigError(
                f"no kvmkit is listening at {path}: start one with 'kvmkit run --api-socket {path}'"
            ) from None
        except PermissionError:
            raise ConfigError(
                f"permission denied on {path}: the socket is its owner's (0600)"
            ) from None
        sock.sendall(json.dumps({**(args or {}), "cmd": cmd}).encode() + b"\n")
        buffered = b""
        while True:
            line, newline, rest = buffered.partition(b"\n")
            if not newline:
                chunk = sock.recv(65536)
                if not chunk:
                    raise KvmkitError(
                        f"the kvmkit at {path} closed the connection without answering"
                    )
                buffered += chunk
                continue
            buffered = rest
            message = json.loads(line)
            if "event" in message and "ok" not in message:
                if on_event is not None:
                    on_event(message["event"])
                continue
            data = line
            break
    except TimeoutError:
        raise KvmkitError(
            f"the kvmkit at {path} did not answer {cmd!r} within {timeout_s} s"
        ) from None
    finally:
        sock.close()
    reply = json.loads(data)
    if not reply.pop("ok", False):
        raise ApiCallError(reply.get("error", "request failed"))
    return reply
