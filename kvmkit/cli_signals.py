"""How the command line ends on SIGTERM and Ctrl-C: as an exception in the main thread
(`Terminated`, `KeyboardInterrupt`) that each command turns into a clean end with its
status (143, 130). `deferred()` holds them while a file the process must not leave
behind is being made (a socket bound but not yet owned by anyone who removes it): a
signal that comes then is raised when the block ends, once the owner can clean up."""

import contextlib
import signal
import threading
from collections.abc import Iterator

from kvmkit.machine.result import Terminated

_held = 0
_pending: list[type[BaseException]] = []


def _raise(kind: type[BaseException]) -> None:
    if _held:
        if kind not in _pending:
            _pending.append(kind)
        return
    raise kind()


def _on_sigterm(signum: int, frame: object) -> None:
    _raise(Terminated)


def _on_sigint(signum: int, frame: object) -> None:
    _raise(KeyboardInterrupt)


def install() -> None:
    """SIGTERM ends a command as Ctrl-C does; both may be deferred (main thread only)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, _on_sigint)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold SIGTERM and Ctrl-C for the block; one that came is raised as it ends."""
    global _held
    _held += 1
    try:
        yield
    finally:
        _held -= 1
        if not _held and _pending:
            kind = _pending.pop(0)
            _pending.clear()
            raise kind()
