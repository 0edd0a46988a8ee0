"""What the control API can do to a running machine, independent of transport.

Which requests exclude which (one migration, snapshot, pause or resume at a time;
status and stop always answered) is the machine's rule, kvmkit/machine/operations.py:
the handlers here just call through it and pass its refusal on.

Each request is decoded into its command's record (`records.decode`): a field of the
wrong type, out of range, missing or unknown is one line naming it, never guessed at
(a "resume" of "yes" is refused, not taken as true).

A streaming command gets `emit`: `emit(event)` sends a progress event, and raises
(the server's ClientGone) once the client went away, which cancels the command;
`emit({})` sends nothing and only checks that the client is still there.
"""

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kvmkit.control.snapshots import take_snapshot
from kvmkit.errors import KvmkitError
from kvmkit.machine.machine import Machine
from kvmkit.machine.result import EXIT_OK
from kvmkit.records import bounds, decode


class ApiError(KvmkitError):
    """A request the API refuses: the message goes back to the caller."""


@dataclass
class PlainRequest:
    """status, pause, resume, stop: nothing but the command."""

    cmd: str


@dataclass
class SnapshotRequest:
    cmd: str
    path: str = field(metadata=bounds(1, 4096))  # the file to write
    resume: bool = False
    force: bool = False
    compress: int | None = field(default=None, metadata=bounds(1, 22))  # a zstd level


@dataclass
class MigrateRequest:
    cmd: str
    to: str = field(metadata=bounds(1, 4096))  # tcp:HOST:PORT or unix:PATH
    max_downtime_ms: float = 20.0
    bandwidth_bps: int = field(default=0, metadata=bounds(0, None))  # 0: no limit
    auto_converge: bool = False
    max_iterations: int = field(default=30, metadata=bounds(1, None))  # pre-copy passes

    def __post_init__(self) -> None:
        if self.max_downtime_ms <= 0:
            raise ValueError("field 'max_downtime_ms' must be a positive number of milliseconds")


def _status(machine: Machine, args: dict[str, Any]) -> dict[str, Any]:
    return machine.status()


def _pause(machine: Machine, args: dict[str, Any]) -> dict[str, Any]:
    machine.pause()
    return machine.status()


def _resume(machine: Machine, args: dict[str, Any]) -> dict[str, Any]:
    machine.resume()
    return machine.status()


def _stop(machine: Machine, args: dict[str, Any]) -> dict[str, Any]:
    machine.stop(EXIT_OK, "stopped through the control API")
    return {"state": "stopped"}


Emit = Callable[[dict[str, Any]], None]
PROGRESS_EVERY_S = 0.1


def _snapshot(machine: Machine, args: dict[str, Any], emit: Emit) -> dict[str, Any]:
    r = decode(SnapshotRequest, args, "snapshot", ApiError)
    path = r.path
    last = 0.0

    def progress(done: int, total: int) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last >= PROGRESS_EVERY_S or done >= total:
            last = now
            emit({"phase": "memory", "done": done, "total": total})
        else:
            emit({})  # only: is the client still there?

    try:
        emit({})  # a client gone before it starts cancels it before the pause
        report = take_snapshot(
            machine,
            path,
            resume=r.resume,
            compress_level=r.compress,
            progress=progress,
            replace=r.force,
        )
    except KvmkitError as e:  # the caller may be gone: say it where the VM runs, too
        print(f"kvmkit: snapshot {path} not written: {e}", file=sys.stderr, flush=True)
        raise
    return {"snapshot": report.to_dict(), **machine.status()}


def _migrate(machine: Machine, args: dict[str, Any], emit: Emit) -> dict[str, Any]:
    from kvmkit.migration import migrate

    r = decode(MigrateRequest, args, "migrate", ApiError)
    try:
        report = migrate(
            machine,
            r.to,
            max_downtime_ms=r.max_downtime_ms,
            bandwidth_bps=r.bandwidth_bps,
            auto_converge=r.auto_converge,
            max_iterations=r.max_iterations,
            progress=emit,
        )
    except KvmkitError as e:  # the caller may be gone: say it where the VM runs, too
        print(f"kvmkit: {e}", file=sys.stderr)
        raise
    return {"migration": report.to_dict()}


# Commands that report progress while they work: the server sends each event as
# {"event": {...}} on its own line before the final answer.
STREAMING: dict[str, Callable[[Machine, dict[str, Any], Emit], dict[str, Any]]] = {
    "migrate": _migrate,
    "snapshot": _snapshot,
}

COMMANDS: dict[str, Callable[[Machine, dict[str, Any]], dict[str, Any]]] = {
    "status": _status,
    "pause": _pause,
    "resume": _resume,
    "stop": _stop,
}


def handle(machine: Machine, request: object, emit: Emit | None = None) -> dict[str, Any]:
    """One request in, one response out (progress events through `emit`); never raises."""
    if not isinstance(request, dict):
        return {"ok": False, "error": 'a request is a JSON object with "cmd"'}
    cmd = request.get("cmd")
    if not isinstance(cmd, str) or (cmd not in COMMANDS and cmd not in STREAMING):
        return {
            "ok": False,
            "error": f"unknown command {cmd!r}: use one of {', '.join([*COMMANDS, *STREAMING])}",
        }
    try:
        if cmd in STREAMING:
            return {"ok": True, **STREAMING[cmd](machine, request, emit or (lambda e: None))}
        decode(PlainRequest, request, cmd, ApiError)
        return {"ok": True, **COMMANDS[cmd](machine, request)}
    except KvmkitError as e:
        return {"ok": False, "error": str(e)}
    except Exception as e:  # a kvmkit bug must not kill the server or the VM
        return {"ok": False, "error": f"internal error: {type(e).__name__}: {e}"}
