"""The debug-exit port: a guest ends the run by writing its status here."""

from collections.abc import Callable

DEBUG_EXIT_PORT = 0x501
DEBUG_EXIT_LEN = 4


class DebugExit:
    """A write of N (any width) ends the machine with exit status N & 0xff."""

    name = "debug-exit"
    state_version = 1

    def __init__(self, on_exit: Callable[[int], None]) -> None:
        self.on_exit = on_exit

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        self.on_exit(value)

    def save_state(self) -> dict[str, object]:
        return {}  # write-only, no registers

    def load_state(self, state: dict[str, object]) -> None:
        pass
