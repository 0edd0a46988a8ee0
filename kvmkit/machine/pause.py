"""`PauseGate`: stop every vCPU thread at a clean point and let them go again.

A pause sets `attention` and kicks each vCPU (immediate_exit plus a signal). A vCPU
leaves KVM_RUN with EINTR; KVM completes any pending port or MMIO exit before it
honours immediate_exit, so after that EINTR nothing is half-done and the vCPU's state
can be read or saved. The thread then parks here until the pause is over.

Pauses are holds, by holder: a snapshot, a migration, the auto-converge throttle and
a user (`ctl pause`) each hold the gate under their own name, and the vCPUs run again
only when no hold is left. So a user's resume never cancels a snapshot's or a
migration's pause. A holder holds at most once (a second pause by it changes
nothing; one release ends it). A pause that fails leaves no hold it took: one that
timed out is withdrawn at once, and one whose hold was released by someone else
before the vCPUs stopped (a resume racing it) reports PauseCancelled; neither takes
effect later. Which controller may pause or resume when is decided above, by the
machine's operations (kvmkit/machine/operations.py).
"""

import threading
from collections.abc import Callable

from kvmkit.errors import KvmkitError
from kvmkit.kvm import Vcpu

USER = "user"


class PauseTimeout(KvmkitError):
    pass


class PauseCancelled(KvmkitError):
    pass


class PauseGate:
    def __init__(self, attention: threading.Event, stopping: threading.Event) -> None:
        self.attention = attention
        self.stopping = stopping
        self._cond = threading.Condition()
        self._holds: set[str] = set()
        self._parked: set[int] = set()
        self._gone: set[int] = set()
        self._expected: set[int] = set()

    def start(self, indices: list[int]) -> None:
        with self._cond:
            self._expected = set(indices)

    @property
    def paused(self) -> bool:
        """True once a pause is held and every running vCPU thread is parked."""
        with self._cond:
            return bool(self._holds) and self._all_parked()

    @property
    def holders(self) -> list[str]:
        with self._cond:
            return sorted(self._holds)

    def held_by(self, holder: str) -> bool:
        with self._cond:
            return holder in self._holds

    def _all_parked(self) -> bool:
        return self._expected <= self._parked | self._gone

    # -- vCPU threads ---------------------------------------------------------------
    def park(self, vcpu: Vcpu) -> bool:
        """Called by a vCPU thread after KVM_RUN gave EINTR with `attention` set. Waits
        while a pause is held; returns False when the machine is stopping."""
        with self._cond:
            if self._holds and not self.stopping.is_set():
                self._parked.add(vcpu.index)
                self._cond.notify_all()
                while self._holds and not self.stopping.is_set():
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
    def hold(self, holder: str, kick: Callable[[], None]) -> None:
        """Take (or keep) `holder`'s hold and ask every vCPU to park; does not wait
        (safe from a device handler on a vCPU thread)."""
        with self._cond:
            self._holds.add(holder)
            self.attention.set()
        kick()

    def pause(self, holder: str, kick: Callable[[], None], timeout_s: float = 10.0) -> None:
        """Hold the gate for `holder` and wait until every vCPU is parked. If that
        fails, the hold this call took is gone before the error is raised:
        PauseTimeout (withdrawn), PauseCancelled (released meanwhile by a resume)."""
        with self._cond:
            already = holder in self._holds
        self.hold(holder, kick)
        with self._cond:
            done = self._cond.wait_for(
                lambda: self._all_parked() or self.stopping.is_set() or holder not in self._holds,
                timeout_s,
            )
            if holder not in self._holds:
                raise PauseCancelled(
                    "the pause was cancelled: a resume came before the vCPUs had stopped"
                )
            if not done:
                missing = sorted(self._expected - self._parked - self._gone)
                if not already:
                    self._drop(holder)
                what = "the earlier pause stays" if already else "the pause was withdrawn"
                raise PauseTimeout(
                    f"vCPUs {missing} did not stop within {timeout_s:g} s of the pause request;"
                    f" {what}"
                )

    def release(self, holder: str) -> bool:
        """Drop `holder`'s hold; the vCPUs go on once no hold is left. False if it
        held none."""
        with self._cond:
            if holder not in self._holds:
                return False
            self._drop(holder)
            return True

    def _drop(self, holder: str) -> None:
        self._holds.discard(holder)
        if not self._holds and not self.stopping.is_set():
            self.attention.clear()
        self._cond.notify_all()

    def wake(self) -> None:
        """Wake parked threads so they see `stopping`."""
        with self._cond:
            self._cond.notify_all()
