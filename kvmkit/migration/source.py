"""The sending side of a live migration.

1. handshake: the stream header and machine description; the target builds an empty
   machine and answers `ready` (or why not).
2. pre-copy: dirty logging on (guest_memfd slots become dirty-logged plain slots over
   the same pages: `GuestMemory.log_dirty`), every populated page once, then the pages
   dirtied meanwhile, again and again, until what is left fits the downtime target at
   the measured bandwidth (or the iterations run out). Auto-converge throttles the
   vCPUs when the guest dirties faster than the link drains. Where KVM refuses dirty
   logging, there is no pre-copy: the machine is migrated stop-and-copy, and the
   report says so.
3. stop-and-copy: pause; what the last iteration left dirty plus what the guest wrote
   since; vCPU, VM and device state; END.
4. commit: the target verifies and loads everything and answers `loaded`; the source
   sends `go`; the target starts and answers `running`; only then does the source stop
   for good.

Any failure before `go` leaves the source as it was: dirty logging off (guest_memfd
slots bound again), running if it was running. A failure after `go` without the
target's `running` leaves the source paused (the target may be running): resuming it
is the operator's call.
"""

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from kvmkit.errors import KvmkitError
from kvmkit.faults import enter_phase
from kvmkit.machine.result import EXIT_OK
from kvmkit.memory.dirty_log import DirtyLog, Run, merge_runs, run_bytes
from kvmkit.memory.layout import PAGE_SIZE
from kvmkit.migration.address import Address, connect, parse_address
from kvmkit.migration.channel import Channel
from kvmkit.migration.pages import ANNOUNCED_RUNS, PageStats, send_pages
from kvmkit.records import encode
from kvmkit.snapshot.format import ITERATION, MACHINE, StreamWriter, pack_json
from kvmkit.snapshot.machine_state import (
    capture_state,
    header_for,
    items_to_capture,
    write_state,
)

if TYPE_CHECKING:
    from kvmkit.machine.machine import Machine

REPLY_TIMEOUT_S = 60.0
DEFAULT_BANDWIDTH_BPS = 1 << 30  # the estimate before a pass has measured the link
PROGRESS_EVERY_S = 0.1
THROTTLE_START, THROTTLE_STEP, THROTTLE_MAX = 0.2, 0.1, 0.99
MIGRATION, THROTTLE = "migration", "throttle"  # their holds on the machine's pause gate


class MigrationError(KvmkitError):
    """A migration that did not complete; the message says where the VM is now."""


class TargetDidNotStart(MigrationError):
    """After the go, the target said it could not start the machine and never will."""


@dataclass
class MigrationReport:
    target: str
    backend: str
    dirty_tracking: str = ""
    total_s: float = 0.0
    downtime_ms: float = 0.0
    iterations: int = 0
    bytes_sent: int = 0
    memory_bytes_sent: int = 0
    pages_sent: int = 0
    pages_resent: int = 0
    zero_pages: int = 0
    bandwidth_bps: float = 0.0
    final_dirty_bytes: int = 0
    throttle_max: float = 0.0
    converged: bool = True
    precopy: bool = True
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Progress events; a callback that raises (its client went away) cancels the
# migration, which then rolls back like any failure before the commit.
ProgressFn = Callable[[dict[str, Any]], None]


class Throttle:
    """Auto-converge: hold every vCPU paused for `fraction` of each period."""

    PERIOD_S = 0.05

    def __init__(self, machine: "Machine") -> None:
        self.machine = machine
        self.fraction = 0.0
        self.max_fraction = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def step_up(self) -> None:
        """Start at THROTTLE_START, then THROTTLE_STEP more each call, up to the max."""
        step = self.fraction + THROTTLE_STEP if self.fraction else THROTTLE_START
        self.fraction = min(THROTTLE_MAX, step)
        self.max_fraction = max(self.max_fraction, self.fraction)
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="kvmkit-throttle", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            held = self.PERIOD_S * self.fraction
            try:
                self.machine.pause(holder=THROTTLE)
            except KvmkitError:
                return
            self._stop.wait(held)
            self.machine.resume(THROTTLE)
            self._stop.wait(self.PERIOD_S - held)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.fraction = 0.0  # `max_fraction` keeps what it took


def migrate(
    machine: "Machine",
    to: str,
    *,
    max_downtime_ms: float = 20.0,
    bandwidth_bps: int = 0,
    auto_converge: bool = False,
    max_iterations: int = 30,
    progress: ProgressFn | None = None,
) -> MigrationReport:
    """Migrate the running (or paused) `machine` to the target listening at `to`
    (`tcp:HOST:PORT` or `unix:PATH`). Returns the report once the target runs; raises
    MigrationError, with this machine as it was, if anything fails before that, and
    OperationRefused if another operation on the machine is in progress."""
    if machine.memory is None or not machine.running:
        raise MigrationError("the machine is not running, so there is nothing to migrate")
    if machine.lazy is not None:
        machine.lazy.finish()  # every page of a lazy restore must be in before it can go
    if machine.memory.hidden:
        raise MigrationError(
            "this machine's RAM is hidden from kvmkit (--hide-guest-memory), so there is no"
            " mapping to read it from: run it without --hide-guest-memory to migrate it"
        )
    if max_downtime_ms <= 0:
        raise MigrationError("the downtime target must be a positive number of milliseconds")
    address = parse_address(to)
    notify = progress or (lambda event: None)
    # One at a time (kvmkit/machine/operations.py): a second migration, a snapshot, a
    # user's pause or resume are refused while this one runs; a stop cancels it (at its
    # next progress event, before the go: past it, nothing undoes the migration).
    with machine.operations.begin(MIGRATION) as operation:

        def checked(event: dict[str, Any]) -> None:
            if not migration.go_sent:
                operation.check()
            notify(event)

        migration = _SourceMigration(
            machine,
            address,
            max_downtime_ms,
            bandwidth_bps,
            auto_converge,
            max_iterations,
            checked,
        )
        return migration.run()


class _SourceMigration:
    def __init__(
        self,
        machine: "Machine",
        address: Address,
        max_downtime_ms: float,
        bandwidth_bps: int,
        auto_converge: bool,
        max_iterations: int,
        notify: ProgressFn,
    ) -> None:
        assert machine.memory is not None
        self.machine = machine
        self.memory = machine.memory
        self.address = address
        self.max_downtime_ms = max_downtime_ms
        self.bandwidth_limit = bandwidth_bps
        self.auto_converge = auto_converge
        self.max_iterations = max_iterations
        self.notify = notify
        self.report = MigrationReport(str(address), self.memory.backend_name)
        self.dirty = DirtyLog(self.memory, machine.dirty_rings)
        self.throttle = Throttle(machine)
        self.was_paused = machine.paused
        self.paused_here = False
        self.go_sent = False
        self.phase = "migration.handshake"
        self.channel: Channel | None = None
        self.writer: StreamWriter | None = None
        self.sent_pages = bytearray(self.memory.size_bytes // PAGE_SIZE)  # 1: sent once
        self._last_event = 0.0

    def _enter(self, phase: str) -> None:
        self.phase = phase
        enter_phase(phase)

    # -- the phases ---------------------------------------------------------------------
    def run(self) -> MigrationReport:
        start = time.monotonic()
        try:
            self._enter("migration.handshake")
            self.channel = Channel(connect(self.address), self.bandwidth_limit)
            self.writer = StreamWriter(self.channel)
            description = self.machine.description
            items = items_to_capture(self.machine, description)
            self.writer.write_header(header_for(self.machine, "migration", description, items))
            self.writer.write_section(MACHINE, [pack_json(encode(description))])
            self._expect("ready")

            self._enter("migration.precopy")
            left = self._precopy()
            # Let the target drain what is still in the sockets' buffers while the guest
            # runs, so the pause covers only the last pages and the state.
            self.writer.write_section(ITERATION, [pack_json({"sync": True})])
            self._expect("synced")

            self._enter("migration.stop-and-copy")
            self.throttle.stop()
            pause_at = time.monotonic()
            self.machine.pause(holder=MIGRATION)
            self.paused_here = True
            # What the last iteration left dirty, and what the guest wrote since.
            runs = merge_runs(left, self.dirty.collect()) if self.dirty.active else left
            self.report.final_dirty_bytes = run_bytes(runs)
            self._send_iteration(runs, live=False, final=True)

            self._enter("migration.state")
            self.writer.write_section(ITERATION, [pack_json({"phase": "state"})])
            write_state(self.writer, capture_state(self.machine))
            self.writer.end()
            self._event({"phase": "state"}, force=True)
            self._expect("loaded")

            self._enter("migration.commit")
            self.channel.send_message({"msg": "go"})
            self.go_sent = True
            self._expect("running")
            return self._finish(start, pause_at)
        except Exception as e:  # every failure rolls back; a kvmkit bug is named as one
            self.throttle.stop()
            raise self._failed(e) from None
        finally:
            self.throttle.stop()
            if self.writer is not None:
                self.writer.close()
            if self.channel is not None:
                self.channel.close()

    def _start_logging(self) -> bool:
        """Dirty logging on; False (and a note) where KVM refuses it."""
        try:
            if self.dirty.needs_pause:
                self.machine.pause(holder=MIGRATION)
                try:
                    self.dirty.start()
                finally:
                    self.machine.resume(MIGRATION)
            else:
                self.dirty.start()
        except KvmkitError as e:
            self.report.precopy = False
            self.report.notes.append(
                f"KVM refused dirty logging ({e}): migrated stop-and-copy, all memory sent"
                " with the guest paused"
            )
            return False
        self.report.dirty_tracking = self.dirty.how
        return True

    def _precopy(self) -> list[Run]:
        """Pre-copy iterations; returns what is still dirty for the final pass."""
        extents, _ = self.memory.populated_extents()
        everything: list[Run] = [(e.offset, e.length) for e in extents]
        if self.was_paused or not self._start_logging():
            return everything  # nothing changes while paused: one pass, all of it, later
        report = self.report
        runs = everything
        while True:
            began, sent_before = time.monotonic(), self._sent()
            self._send_iteration(runs, live=True)
            took = time.monotonic() - began
            sent = self._sent() - sent_before
            if took > 0 and sent >= 1 << 20:
                report.bandwidth_bps = sent / took
            runs = self.dirty.collect()
            remaining = run_bytes(runs)
            rate = report.bandwidth_bps or self.bandwidth_limit or DEFAULT_BANDWIDTH_BPS
            estimate_ms = 1000 * remaining / rate
            dirty_rate = remaining / took if took > 0 else 0.0
            self._event(
                {
                    "phase": "precopy",
                    "iteration": report.iterations,
                    "dirty_bytes": remaining,
                    "dirty_rate_bps": dirty_rate,
                    "estimated_downtime_ms": estimate_ms,
                },
                force=True,
            )
            if estimate_ms <= self.max_downtime_ms:
                return runs
            if report.iterations >= self.max_iterations:
                report.converged = False
                throttled = (
                    f", throttled to {self.throttle.fraction:.0%}" if self.throttle.fraction else ""
                )
                report.notes.append(
                    f"did not converge in {self.max_iterations} iterations: the last pass"
                    f" ({took:.2f} s) left {remaining >> 10} KiB dirty, at least"
                    f" {dirty_rate / (1 << 20):.0f} MiB/s of distinct pages from the guest"
                    f"{throttled}, against a link of {rate / (1 << 20):.0f} MiB/s; those"
                    " pages went with the guest paused"
                    + ("" if self.auto_converge else " (--auto-converge throttles the vCPUs)")
                )
                return runs
            if self.auto_converge and dirty_rate > 0.5 * rate:
                self.throttle.step_up()

    def _send_iteration(self, runs: list[Run], live: bool, final: bool = False) -> None:
        assert self.writer is not None
        report = self.report
        total = run_bytes(runs)
        info: dict[str, Any] = {"iteration": report.iterations, "bytes": total}
        if report.iterations == 0 and not final and len(runs) <= ANNOUNCED_RUNS:
            info["runs"] = runs  # the target can allocate these while they come
        self.writer.write_section(ITERATION, [pack_json(info)])
        base = self._sent()

        def sending(done: int) -> None:
            self._event(
                {"phase": "final" if final else "precopy", "iteration_bytes": total, "done": done}
            )

        stats = send_pages(self.writer, self.memory, runs, live=live, progress=sending)
        self._count(stats, runs)
        report.memory_bytes_sent += self._sent() - base
        report.iterations += 0 if final else 1

    def _finish(self, start: float, pause_at: float) -> MigrationReport:
        report = self.report
        assert self.channel is not None
        report.downtime_ms = (time.monotonic() - pause_at) * 1000
        report.bytes_sent = self.channel.sent
        report.total_s = time.monotonic() - start
        report.throttle_max = self.throttle.max_fraction
        if self.dirty.ring_losses:
            report.notes.append(
                f"the dirty ring overflowed {self.dirty.ring_losses} time(s), so every"
                " populated page was resent then (KVM wrote past the ring's end)"
            )
        if report.downtime_ms > self.max_downtime_ms:
            report.notes.append(
                f"downtime {report.downtime_ms:.1f} ms was above the {self.max_downtime_ms:g} ms"
                " target"
            )
        self.machine.stop(EXIT_OK, f"migrated to {self.address}")
        self._event({"phase": "done", **report.to_dict()}, force=True)
        return report

    # -- failures -----------------------------------------------------------------------
    def _failed(self, e: Exception) -> MigrationError:
        if not isinstance(e, KvmkitError | OSError):
            e = KvmkitError(f"internal error: {type(e).__name__}: {e}")
        if self.go_sent and not isinstance(e, TargetDidNotStart):
            # Paused for good, as the operator's pause: dirty logging has nothing left to
            # track (guest_memfd slots are bound again), and a later resume runs as usual.
            with contextlib.suppress(KvmkitError):
                if self.dirty.active:
                    self.dirty.stop()
            self.machine.request_pause()
            self.machine.resume(MIGRATION)
            return MigrationError(
                f"migration to {self.address} failed after the go ({e}): the target may be"
                " running, so this VM stays paused; resume it ('kvmkit ctl resume') only if"
                " the target is not running"
            )
        where = self.phase.removeprefix("migration.")
        state = self._roll_back()
        return MigrationError(
            f"migration to {self.address} failed during {where}: {e}; this VM is {state}"
        )

    def _roll_back(self) -> str:
        """Dirty logging off, guest_memfd slots bound again, running again if it was."""
        machine = self.machine
        if not machine.running:
            return "stopped (it ended during the migration)"
        with contextlib.suppress(KvmkitError):
            if self.dirty.active:
                if self.dirty.needs_pause and not self.paused_here:
                    machine.pause(holder=MIGRATION)
                    self.paused_here = True
                self.dirty.stop()
        if self.paused_here:
            machine.resume(MIGRATION)
        return ("paused" if self.was_paused else "running") + ", unchanged"

    # -- helpers ------------------------------------------------------------------------
    def _sent(self) -> int:
        return self.channel.sent if self.channel is not None else 0

    def _expect(self, what: str) -> None:
        assert self.channel is not None
        reply = self.channel.recv_message(REPLY_TIMEOUT_S)
        if reply.get("msg") == "error":
            why = reply.get("error", "no reason given")
            if self.go_sent and reply.get("started") is False:
                raise TargetDidNotStart(why)
            raise MigrationError(f"the target refused: {why}")
        if reply.get("msg") != what:
            raise MigrationError(f"the target answered {reply!r} where {what!r} was due")

    def _count(self, stats: PageStats, runs: list[Run]) -> None:
        report = self.report
        report.pages_sent += stats.pages
        report.zero_pages += stats.zero_pages
        sent = self.sent_pages
        for offset, length in runs:
            first, end = offset // PAGE_SIZE, (offset + length) // PAGE_SIZE
            report.pages_resent += sent.count(1, first, end)
            sent[first:end] = b"\x01" * (end - first)

    def _event(self, event: dict[str, Any], force: bool = False) -> None:
        """A progress event, at most every PROGRESS_EVERY_S unless `force`."""
        now = time.monotonic()
        if not force and now - self._last_event < PROGRESS_EVERY_S:
            return
        self._last_event = now
        report = self.report
        if self.go_sent:  # past the commit nothing may undo the migration: just tell
            with contextlib.suppress(Exception):
                self.notify({"iteration": report.iterations, **event})
            return
        self.notify(
            {
                "iteration": report.iterations,
                "bytes_sent": self._sent(),
                "bandwidth_bps": report.bandwidth_bps,
                "throttle": self.throttle.fraction,
                **event,
            }
        )
