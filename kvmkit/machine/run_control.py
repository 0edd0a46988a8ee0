"""How a run ends: the first `stop()` decides the result; the events every thread
watches; the pause gate; what the guest's own devices ask (exit, reset)."""

import threading
from collections.abc import Callable

from kvmkit.machine.kernel_console import KernelConsole
from kvmkit.machine.pause import PauseGate
from kvmkit.machine.result import EXIT_GUEST_CRASH, EXIT_HOST_ERROR, EXIT_OK, RunResult


class RunControl:
    def __init__(self) -> None:
        self.stopping = threading.Event()
        self.attention = threading.Event()  # stop or pause: vCPU threads check on EINTR
        self.gate = PauseGate(self.attention, self.stopping)
        self.result: RunResult | None = None
        self.kick_all: Callable[[], None] = lambda: None  # set by the machine
        self.kernel: KernelConsole | None = None  # a Linux guest's console, as read
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
    def _guest_ended(self, status: int, reason: str) -> None:
        """End the run as the guest asked, unless a Linux guest's console said more: a
        panic (then the reset or halt is the panic's), or a power-down."""
        kernel = self.kernel
        if kernel is not None and kernel.panic is not None:
            self.kernel_panicked()
        elif kernel is not None and kernel.power_down and status == EXIT_OK:
            self.stop(EXIT_OK, "guest powered off")
        else:
            self.stop(status, reason)

    def kernel_panicked(self) -> None:
        """A Linux guest's kernel panicked (its console said so): the run ends with the
        panic's message, whether the kernel then reboots or stops for good."""
        panic = self.kernel.panic if self.kernel is not None else None
        self.stop(EXIT_GUEST_CRASH, f"guest kernel panicked: {panic}")

    def guest_exit(self, value: int) -> None:
        """The debug-exit port: the guest's own status (a Linux guest's power-off with
        poweroff_port=0x501 writes 0 here)."""
        self._guest_ended(value & 0xFF, f"guest exited with status {value}")

    def guest_reset(self, how: str = "reset through the i8042 controller") -> None:
        """A reset request (the i8042's pulse, or a Linux guest's triple fault); it ends
        the run."""
        self._guest_ended(EXIT_OK, f"guest rebooted ({how})")

    def all_halted(self) -> None:
        """Every vCPU halted for good: the end of a built-in guest, or a Linux kernel
        that halted after "Power down" (no way to power off without ACPI)."""
        self._guest_ended(EXIT_OK, "all vCPUs halted")

    def device_error(self, owner: str, error: BaseException) -> None:
        self.stop(EXIT_HOST_ERROR, f"{owner}: internal error: {type(error).__name__}: {error}")
