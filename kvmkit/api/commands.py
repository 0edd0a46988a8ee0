"""What the control API can do to a running machine, independent of transport."""

from collections.abc import Callable
from typing import Any, Protocol

from kvmkit.errors import KvmkitError
from kvmkit.machine.result import EXIT_OK


class ApiError(KvmkitError):
    """A request the API refuses: the message goes back to the caller."""


class Controllable(Protocol):
    def pause(self, timeout_s: float = ...) -> None: ...
    def resume(self) -> None: ...
    def status(self) -> dict[str, Any]: ...
    def stop(self, status: int, reason: str, detail: str = "") -> None: ...
    def snapshot(
        self, path: str, *, resume: bool = ..., compress_level: int | None = ...
    ) -> Any: ...  # noqa: ANN401, E501


def _status(machine: Controllable, args: dict[str, Any]) -> dict[str, Any]:
    return machine.status()


def _pause(machine: Controllable, args: dict[str, Any]) -> dict[str, Any]:
    machine.pause()
    return machine.status()


def _resume(machine: Controllable, args: dict[str, Any]) -> dict[str, Any]:
    machine.resume()
    return machine.status()


def _stop(machine: Controllable, args: dict[str, Any]) -> dict[str, Any]:
    machine.stop(EXIT_OK, "stopped through the control API")
    return {"state": "stopped"}


def _snapshot(machine: Controllable, args: dict[str, Any]) -> dict[str, Any]:
    path = args.get("path")
    if not isinstance(path, str) or not path:
        raise ApiError('snapshot needs "path": the file to write')
    level = args.get("compress")
    if level is not None and (not isinstance(level, int) or not 1 <= level <= 22):
        raise ApiError('"compress" is a zstd level from 1 to 22')
    report = machine.snapshot(path, resume=bool(args.get("resume", False)), compress_level=level)
    return {"snapshot": report.to_dict(), **machine.status()}


COMMANDS: dict[str, Callable[[Controllable, dict[str, Any]], dict[str, Any]]] = {
    "status": _status,
    "pause": _pause,
    "resume": _resume,
    "snapshot": _snapshot,
    "stop": _stop,
}


def handle(machine: Controllable, request: object) -> dict[str, Any]:
    """One request in, one response out; never raises."""
    if not isinstance(request, dict):
        return {"ok": False, "error": 'a request is a JSON object with "cmd"'}
    cmd = request.get("cmd")
    handler = COMMANDS.get(cmd) if isinstance(cmd, str) else None
    if handler is None:
        return {
            "ok": False,
            "error": f"unknown command {cmd!r}: use one of {', '.join(COMMANDS)}",
        }
    try:
        return {"ok": True, **handler(machine, request)}
    except KvmkitError as e:
        return {"ok": False, "error": str(e)}
    except Exception as e:  # a kvmkit bug must not kill the server or the VM
        return {"ok": False, "error": f"internal error: {type(e).__name__}: {e}"}
