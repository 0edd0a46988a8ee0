"""The debug-exit port: a guest ends the run by writing its status here."""

from collections.abc import Callable
from dataclasses import dataclass

DEBUG_EXIT_PORT = 0x501
DEBUG_EXIT_LEN = 4


@dataclass(frozen=True)
class DebugExitState:
    """Write-only: no registers."""


class DebugExit:
    """A write of N (any width) ends the machine with exit status N & 0xff."""

    state_version = 1
    state_type = DebugExitState

    def __init__(self, on_exit: Callable[[int], None], name: str = "debug-exit") -> None:
        self.name = name
        self.on_exit = on_exit

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        self.on_exit(value)

    def save_state(self) -> DebugExitState:
        return DebugExitState()
