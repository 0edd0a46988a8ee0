"""What the control API can do to a running machine, independent of transport.

Which requests exclude which (one migration, snapshot, pause or resume at a time;
status and stop always answered) is the machine's rule, kvmkit/machine/operations.py:
the handlers here just call through it and pass its refusal on.

A streaming command gets `emit`: `emit(event)` sends a progress event, and raises
(the server's ClientGone) once the client went away, which cancels the command;
`emit({})` sends nothing and only checks that the client is still there.
"""

import sys
import time
from collections.abc import Callable
from typing import Any

from kvmkit.control.snapshots import take_snapshot
from kvmkit.errors import KvmkitError
from kvmkit.machine.machine import Machine
from kvmkit.machine.result import EXIT_OK


class ApiError(KvmkitError):
    """A request the API refuses: the message goes back to the caller."""


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
    path = args.get("path")
    if not isinstance(path, str) or not path:
        raise ApiError('snapshot needs "path": the file to write')
    level = args.get("compress")
    if level is not None and (
        not isinstance(level, int) or isinstance(level, bool) or not 1 <= level <= 22
    ):
        raise ApiError('"compress" is a zstd level from 1 to 22')
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
            resume=bool(args.get("resume", False)),
            compress_level=level,
            progress=progress,
            replace=bool(args.get("force", False)),
        )
    except KvmkitError as e:  # the caller may be gone: say it where the VM runs, too
        print(f"kvmkit: snapshot {path} not written: {e}", file=sys.stderr, flush=True)
        raise
    return {"snapshot": report.to_dict(), **machine.status()}


def _migrate(machine: Machine, args: dict[str, Any], emit: Emit) -> dict[str, Any]:
    from kvmkit.migration import migrate

    to = args.get("to")
    if not isinstance(to, str) or not to:
        raise ApiError('migrate needs "to": tcp:HOST:PORT or unix:PATH of a listening target')
    downtime = args.get("max_downtime_ms", 20)
    bandwidth = args.get("bandwidth_bps", 0)
    if not isinstance(downtime, int | float) or downtime <= 0:
        raise ApiError('"max_downtime_ms" is a positive number of milliseconds')
    if not isinstance(bandwidth, int) or bandwidth < 0:
        raise ApiError('"bandwidth_bps" is a whole number of bytes per second (0: no limit)')
    iterations = args.get("max_iterations", 30)
    if not isinstance(iterations, int) or iterations < 1:
        raise ApiError('"max_iterations" is a whole number of pre-copy passes, at least 1')
    try:
        report = migrate(
            machine,
            to,
            max_downtime_ms=float(downtime),
            bandwidth_bps=bandwidth,
            auto_converge=bool(args.get("auto_converge", False)),
            max_iterations=iterations,
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
        return {"ok": True, **COMMANDS[cmd](machine, request)}
    except KvmkitError as e:
        return {"ok": False, "error": str(e)}
    except Exception as e:  # a kvmkit bug must not kill the server or the VM
        return {"ok": False, "error": f"internal error: {type(e).__name__}: {e}"}
