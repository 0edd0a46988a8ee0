"""One operation at a time: which operations on a machine exclude which.

An operation is something a controller asks of a running machine that changes
whether it runs, or reads all of it: a live migration, a snapshot, a (user's) pause,
a resume. While one is in progress, every operation it excludes is refused at once,
with one line naming the one in progress ("a migration of this machine is in
progress: ..."), rather than queued or interleaved. Two migrations at once would
each miss pages the other's dirty-log reads cleared (KVM clears dirty bits on read),
and a target could start with stale memory; a pause or resume during a snapshot or
migration would change what it is saving under it.

    in progress   refuses
    migration     migration, snapshot, pause, resume
    snapshot      migration, snapshot, pause, resume
    pause         migration, snapshot, pause, resume
    resume        migration, snapshot, pause, resume

`status` (reading) and `stop` are never refused. `stop` ends the run; an operation in
progress sees that at its next `Operation.check()` and ends as cancelled (a snapshot
leaves no file, a migration rolls back), and `Machine.close()` waits for it before it
frees guest memory.

Every front goes through here, so the rule holds whoever asks: `Machine.pause()` and
`Machine.resume()` (the user's pause, holder "user") begin "pause" and "resume";
`kvmkit.control.snapshots.take_snapshot` begins "snapshot"; `kvmkit.migration.migrate`
begins "migration". A new front (an HTTP API) calls those, and gets the same refusals
as `OperationRefused` (a KvmkitError whose message is the answer to give).
Pauses that are part of an operation (the snapshot's, the migration's, the
auto-converge throttle's) are holds under their own names (kvmkit/machine/pause.py)
and are not operations themselves.
"""

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from kvmkit.errors import KvmkitError

MIGRATION, SNAPSHOT, PAUSE, RESUME = "migration", "snapshot", "pause", "resume"
EXCLUSIVE = frozenset({MIGRATION, SNAPSHOT, PAUSE, RESUME})
EXCLUDES: dict[str, frozenset[str]] = {name: EXCLUSIVE for name in EXCLUSIVE}
NEVER_REFUSED = ("status", "stop")

_WHAT_TO_DO = {
    MIGRATION: "wait for it to end, or cancel it (Ctrl-C on 'kvmkit migrate send')",
    SNAPSHOT: "wait for it to end, or cancel it (Ctrl-C on 'kvmkit snapshot create')",
    PAUSE: "try again when it has ended",
    RESUME: "try again when it has ended",
}


class OperationRefused(KvmkitError):
    """Another operation on this machine is in progress; the message names it."""


class OperationCancelled(KvmkitError):
    """The machine stopped while the operation was in progress."""


class Operation:
    """One operation in progress; `check()` raises once the machine is stopping."""

    def __init__(self, name: str, stopping: threading.Event) -> None:
        self.name = name
        self._stopping = stopping

    def check(self) -> None:
        if self._stopping.is_set():
            raise OperationCancelled(f"the machine was stopped during the {self.name}")


class Operations:
    """The operations in progress on one machine."""

    def __init__(self, stopping: threading.Event) -> None:
        self._stopping = stopping
        self._running: list[Operation] = []
        self._cond = threading.Condition()

    @property
    def in_progress(self) -> list[str]:
        with self._cond:
            return [op.name for op in self._running]

    @contextmanager
    def begin(self, name: str) -> Iterator[Operation]:
        """Run operation `name` for the `with` block, or raise OperationRefused if one
        it conflicts with is in progress."""
        if name not in EXCLUDES:
            raise ValueError(f"unknown operation {name!r}")
        with self._cond:
            for op in self._running:
                if name in EXCLUDES[op.name]:
                    raise OperationRefused(
                        f"a {op.name} of this machine is in progress: {_WHAT_TO_DO[op.name]}"
                    )
            current = Operation(name, self._stopping)
            self._running.append(current)
        try:
            yield current
        finally:
            with self._cond:
                self._running.remove(current)
                self._cond.notify_all()

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no operation is in progress; False if one still is."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._running, timeout_s)
