"""`PauseGate`: stop every vCPU thread at a clean point and let them go again.

A pause sets `attention` and kicks each vCPU (immediate_exit plus a signal). A vCPU
leaves KVM_RUN with EINTR; KVM completes any pending port or MMIO exit before it
honours immediate_exit, so after that EINTR nothing is half-done and the vCPU's state
can be read or saved. The thread then parks here until `resume()`.
"""

import threading
from collections.abc import Callable

from kvmkit.errors import KvmkitError
from kvmkit.kvm import Vcpu


class PauseTimeout(KvmkitError):
    pass


class PauseGate:
    def __init__(self, attention: threading.Event, stopping: threading.Event) -> None:
        self.attention = attention
        self.stopping = stopping
        self._cond = threading.Condition()
        self._wanted = False
        self._parked: set[int] = set()
        self._gone: set[int] = set()
        self._expected: set[int] = set()

    def start(self, indices: list[int]) -> None:
        with self._cond:
            self._expected = set(indices)

    @property
    def paused(self) -> bool:
        """True once every running vCPU thread is parked."""
        with self._cond:
            return self._wanted and self._all_parked()

    def _all_parked(self) -> bool:
        return self._expected <= self._parked | self._gone

    # -- vCPU threads ---------------------------------------------------------------
    def park(self, vcpu: Vcpu) -> bool:
        """Called by a vCPU thread after KVM_RUN gave EINTR with `attention` set. Waits
        while a pause is wanted; returns False when the machine is stopping."""
        with self._cond:
            if self._wanted and not self.stopping.is_set():
                self._parked.add(vcpu.index)
                self._cond.notify_all()
                while self._wanted and not self.stopping.is_set():
                    self._cond.wait()
                self._parked.discard(vcpu.index)
            vcpu.run_struct.immediate_exit = 0
            if self.attention.is_set():  # paused again already: leave KVM_RUN at once
                vcpu.run_struct.immediate_exit = 1
            return not self.stopping.is_set()

    def gone(self, index: int) -> None:
        """A vCPU thread ended (halted or stopped): it counts as parked from now on."""
        with self._cond:
            self._gone.add(index)
            self._cond.notify_all()

    # -- controllers ----------------------------------------------------------------
    def request(self, kick: Callable[[], None]) -> None:
        """Ask every vCPU to park, without waiting (safe from a device handler)."""
        with self._cond:
            self._wanted = True
            self.attention.set()
        kick()

    def pause(self, kick: Callable[[], None], timeout_s: float = 10.0) -> None:
        """Park every vCPU and wait until they are all parked."""
        self.request(kick)
        with self._cond:
            if not self._cond.wait_for(
                lambda: self._all_parked() or self.stopping.is_set(), timeout_s
            ):
                missing = sorted(self._expected - self._parked - self._gone)
                raise PauseTimeout(
                    f"vCPUs {missing} did not stop within {timeout_s:g} s of the pause request"
                )

    def wake(self) -> None:
        """Wake parked threads so they see `stopping`."""
        with self._cond:
            self._cond.notify_all()

    def resume(self) -> None:
        with self._cond:
            self._wanted = False
            if not self.stopping.is_set():
                self.attention.clear()
            self._cond.notify_all()
