"""How a run ends: the first `stop()` decides the result; the events every thread
watches; the pause gate; what the guest's own devices ask (exit, reset)."""

import threading
from collections.abc import Callable

from kvmkit.machine.pause import PauseGate
from kvmkit.machine.result import EXIT_GUEST_CRASH, EXIT_HOST_ERROR, EXIT_OK, RunResult


class RunControl:
    def __init__(self) -> None:
        self.stopping = threading.Event()
        self.attention = threading.Event()  # stop or pause: vCPU threads check on EINTR
        self.gate = PauseGate(self.attention, self.stopping)
        self.result: RunResult | None = None
        self.kick_all: Callable[[], None] = lambda: None  # set by the machine
        self.panic: str | None = None  # the guest kernel's panic line, if it printed one
        self._lock = threading.Lock()

    def stop(self, status: int, reason: str, detail: str = "") -> None:
        """End the run; the first call decides the result. Safe from any thread."""
        with self._lock:
            if self.result is not None:
                return
            self.result = RunResult(status=status, reason=reason, detail=detail)
        self.stopping.set()
        self.attention.set()
        self.gate.wake()
        self.kick_all()

    # -- what devices and the event loop report --------------------------------------------
    def guest_exit(self, value: int) -> None:
        """The debug-exit port: the guest's own status."""
        self.stop(value & 0xFF, f"guest exited with status {value}")

    def guest_reset(self) -> None:
        """A reset request (the i8042's pulse): after a kernel panic it is the panic's
        reboot; otherwise the guest rebooted, which ends the run."""
        if self.panic is not None:
            self.stop(EXIT_GUEST_CRASH, f"guest kernel panicked: {self.panic}")
        else:
            self.stop(EXIT_OK, "guest rebooted (reset through the i8042 controller)")

    def device_error(self, owner: str, error: BaseException) -> None:
        self.stop(EXIT_HOST_ERROR, f"{owner}: internal error: {type(error).__name__}: {error}")
