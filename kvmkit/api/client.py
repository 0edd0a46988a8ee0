"""Calling a running kvmkit's control API.

A machine whose control queue is full (its listen backlog, or the most clients it
serves at once) is retried, backing off, for up to `connect_timeout_s`; then the
caller gets one line saying the machine did not take the request.
"""

import json
import socket
import time
from collections.abc import Callable
from typing import Any

from kvmkit.errors import ConfigError, KvmkitError

CONNECT_TIMEOUT_S = 30.0
FIRST_BACKOFF_S = 0.005
MAX_BACKOFF_S = 0.25


class ApiCallError(KvmkitError):
    """The machine refused or failed a request; the message is its answer."""


class _Busy(Exception):
    """The machine asked us to try again (its queue was full)."""


def call(
    path: str,
    cmd: str,
    args: dict[str, Any] | None = None,
    timeout_s: float | None = 600.0,
    on_event: Callable[[dict[str, Any]], None] | None = None,
    connect_timeout_s: float = CONNECT_TIMEOUT_S,
) -> dict[str, Any]:
    """Send one request (`cmd` plus `args`) to the kvmkit serving `path`; return the
    response's fields, or raise ApiCallError with the machine's answer. Progress
    events a command sends before its answer go to `on_event`. While the machine's
    control queue is full, retry for up to `connect_timeout_s`."""
    deadline = time.monotonic() + connect_timeout_s
    backoff = FIRST_BACKOFF_S
    last = "its control queue stayed full"
    while True:
        try:
            return _call_once(path, cmd, args, timeout_s, on_event)
        except _Busy as e:
            last = str(e) or last
        if time.monotonic() + backoff > deadline:
            raise KvmkitError(
                f"the kvmkit at {path} did not take {cmd!r} within {connect_timeout_s:g} s"
                f" ({last}): it may be overloaded or hung"
            )
        time.sleep(backoff)
        backoff = min(backoff * 2, MAX_BACKOFF_S)


def _call_once(
    path: str,
    cmd: str,
    args: dict[str, Any] | None,
    timeout_s: float | None,
    on_event: Callable[[dict[str, Any]], None] | None,
) -> dict[str, Any]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
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
        except BlockingIOError:  # the listen backlog is full
            raise _Busy("its control queue stayed full") from None
        try:
            sock.sendall(json.dumps({**(args or {}), "cmd": cmd}).encode() + b"\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused at once (busy): its one line may still be there to read
        reply = _read_reply(sock, path, on_event)
    except TimeoutError:
        raise KvmkitError(
            f"the kvmkit at {path} did not answer {cmd!r} within {timeout_s} s"
        ) from None
    finally:
        sock.close()
    if not reply.pop("ok", False):
        if reply.get("retry"):
            raise _Busy(str(reply.get("error", "busy")))
        raise ApiCallError(reply.get("error", "request failed"))
    return reply


def _read_reply(
    sock: socket.socket, path: str, on_event: Callable[[dict[str, Any]], None] | None
) -> dict[str, Any]:
    buffered = b""
    while True:
        line, newline, rest = buffered.partition(b"\n")
        if not newline:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                raise KvmkitError(f"the kvmkit at {path} closed the connection without answering")
            buffered += chunk
            continue
        buffered = rest
        try:
            message = json.loads(line)
        except ValueError:
            raise KvmkitError(f"the kvmkit at {path} answered something that is not JSON") from None
        if not isinstance(message, dict):
            raise KvmkitError(f"the kvmkit at {path} answered something that is not an object")
        if "event" in message and "ok" not in message:
            if on_event is not None:
                on_event(message["event"])
            continue
        return message
