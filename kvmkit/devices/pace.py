"""Port 0x82, the pace port: a write holds the writing vCPU until the next tick of a
host clock (one tick per millisecond), so a guest that does N things between writes
does them at N per millisecond, whatever the emulation speed. The `dirtier` guest
uses it to dirty memory at a set rate."""

import threading
import time
from dataclasses import dataclass, field

from kvmkit.records import bounds

PACE_PORT = 0x82
TICK_S = 0.001


@dataclass(frozen=True)
class PaceState:
    ticks: int = field(default=0, metadata=bounds(0, None))


class PaceClock:
    state_version = 1
    state_type = PaceState

    def __init__(self, state: PaceState | None = None, name: str = "pace") -> None:
        self.name = name
        self._lock = threading.Lock()
        self._next = 0.0
        self.ticks = (state or PaceState()).ticks

    def read(self, offset: int, size: int) -> int:
        return self.ticks & 0xFF

    def write(self, offset: int, size: int, value: int) -> None:
        with self._lock:
            now = time.monotonic()
            self._next = max(self._next + TICK_S, now)
            due = self._next
            self.ticks += 1
        wait = due - now
        if wait > 0:
            time.sleep(wait)

    def save_state(self) -> PaceState:
        return PaceState(self.ticks)
