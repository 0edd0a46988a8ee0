"""Noticing that a guest with an in-kernel LAPIC has halted for good.

With KVM's in-kernel LAPIC a HLT does not exit to kvmkit: the vCPU thread sleeps in
KVM_RUN until an interrupt wakes it. A guest that halts every vCPU with interrupts
off (the end of a built-in guest, a Linux `halt`) would then sleep forever, so this
watcher looks at each vCPU thread's scheduler state (/proc/self/task/TID/stat) every
`INTERVAL_S`; a thread seen sleeping twice running is kicked out of KVM_RUN with a
check request, and the vCPU thread reports whether its vCPU is idle for good: halted
with RFLAGS.IF clear, or an application processor still waiting for its start-up IPI.
When every vCPU reports idle, a confirming round asks them all again, and only if
all are still idle does the machine stop with status 0.

A guest halted with interrupts on is left waiting for them: it reports not idle.
"""

import contextlib
import threading
from collections.abc import Callable

INTERVAL_S = 0.02
MAX_BACKOFF = 25  # intervals between checks of a vCPU that waits with interrupts on
CONFIRM_TIMEOUT_S = 1.0


class HaltWatch:
    def __init__(
        self,
        nr_vcpus: int,
        kick: Callable[[int], None],
        on_all_idle: Callable[[], None],
        stopping: threading.Event,
    ) -> None:
        self.kick = kick  # (vCPU index): make that vCPU's thread leave KVM_RUN
        self.on_all_idle = on_all_idle
        self.stopping = stopping
        self.tids: list[int | None] = [None] * nr_vcpus
        self._cond = threading.Condition()
        self._requested = [False] * nr_vcpus
        self._idle: list[bool | None] = [None] * nr_vcpus  # the last report of each
        self._thread = threading.Thread(target=self._run, name="kvmkit-halt-watch", daemon=True)
        self.checks = 0

    def start(self) -> None:
        self._thread.start()

    # -- vCPU threads ------------------------------------------------------------------
    def wants_check(self, index: int) -> bool:
        return self._requested[index]

    def report(self, index: int, idle: bool) -> None:
        """A vCPU thread's answer to a check request."""
        with self._cond:
            self._requested[index] = False
            self._idle[index] = idle
            self.checks += 1
            self._cond.notify_all()

    # -- the watcher thread ------------------------------------------------------------
    def _request(self, index: int) -> None:
        with self._cond:
            self._requested[index] = True
        self.kick(index)

    def _run(self) -> None:
        n = len(self.tids)
        sleeping = [0] * n
        backoff = [2] * n  # sleeping samples before the next check of each vCPU
        while not self.stopping.wait(INTERVAL_S):
            for i, tid in enumerate(self.tids):
                if _thread_state(tid) != "S":
                    sleeping[i], backoff[i] = 0, 2
                    continue
                sleeping[i] += 1
                if sleeping[i] >= backoff[i] and not self._requested[i]:
                    sleeping[i] = 0
                    # Checked and found waiting for an interrupt: look again less often.
                    backoff[i] = (
                        2 if self._idle[i] is not False else min(backoff[i] * 2, MAX_BACKOFF)
                    )
                    self._request(i)
            with self._cond:
                all_idle = all(self._idle)
            if all_idle and self._confirm():
                self.on_all_idle()
                return

    def _confirm(self) -> bool:
        """Ask every vCPU again; True if all report idle within the timeout."""
        with self._cond:
            self._idle = [None] * len(self.tids)
        for i in range(len(self.tids)):
            self._request(i)
        with self._cond:
            self._cond.wait_for(
                lambda: None not in self._idle or self.stopping.is_set(), CONFIRM_TIMEOUT_S
            )
            return all(self._idle) and not self.stopping.is_set()


def _thread_state(tid: int | None) -> str:
    """The scheduler state letter of a thread of this process ('R', 'S', ...)."""
    if tid is None:
        return ""
    with contextlib.suppress(OSError):
        with open(f"/proc/self/task/{tid}/stat", "rb") as f:
            stat = f.read()
        return chr(stat[stat.rindex(b")") + 2])
    return ""
