"""`Machine`: a built VM and its lifecycle: run, pause, resume, stop, close.

Machines come from the builder (kvmkit/machine/builder.py: `build_for_boot`,
`build_from_saved`). Saving and restoring them, and migrating them, is done above
(kvmkit/control/, kvmkit/migration/) through what a Machine exposes.
"""

import signal
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol

from kvmkit import faults
from kvmkit.arch.x86.registers import format_registers
from kvmkit.closing import Closeable
from kvmkit.devices.bus import Bus, Device
from kvmkit.devices.console import ConsoleOutput
from kvmkit.devices.post import PostCode
from kvmkit.devices.serial import Serial16550
from kvmkit.errors import KvmkitError
from kvmkit.faults import enter_phase
from kvmkit.kvm import Kvm, KvmError, Vcpu, Vm
from kvmkit.kvm.exits import NR_REASONS
from kvmkit.kvm.vcpu import install_kick_handler, kick_handler
from kvmkit.libc import malloc_trim
from kvmkit.machine.boot import BootPlan
from kvmkit.machine.device_manager import DeviceManager
from kvmkit.machine.event_loop import EventLoop
from kvmkit.machine.halt_watch import HaltWatch
from kvmkit.machine.operations import PAUSE, RESUME, Operations
from kvmkit.machine.pause import USER
from kvmkit.machine.resources import VmResources
from kvmkit.machine.result import (
    EXIT_HOST_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_TERMINATED,
    RunResult,
    Terminated,
)
from kvmkit.machine.run_control import RunControl
from kvmkit.machine.vcpu_loop import VcpuPort, run_vcpu
from kvmkit.memory import GuestMemory
from kvmkit.memory.dirty_ring import DirtyRings
from kvmkit.snapshot.model import MachineDescription
from kvmkit.uapi.cpu import (
    KVM_MP_STATE_HALTED,
    KVM_MP_STATE_INIT_RECEIVED,
    KVM_MP_STATE_UNINITIALIZED,
)
from kvmkit.uapi.exits import ExitReason

JOIN_TIMEOUT_S = 5.0
OPERATION_END_TIMEOUT_S = 30.0  # what close() waits for a snapshot or migration to end
RFLAGS_IF = 1 << 9
WAITING_FOR_SIPI = (KVM_MP_STATE_UNINITIALIZED, KVM_MP_STATE_INIT_RECEIVED)


class MemoryFiller(Protocol):
    """Something still filling guest memory after the machine was built (a lazy
    restore): finished before the memory is saved again, closed with the machine."""

    def finish(self) -> None: ...

    def close(self) -> None: ...


@dataclass
class MachineParts:
    """What the builder made, handed to the Machine that owns it from then on."""

    control: RunControl
    kvm: Kvm
    vm: Vm
    memory: GuestMemory
    vcpus: list[Vcpu]
    devices: DeviceManager
    events: EventLoop
    console: ConsoleOutput
    description: MachineDescription
    resources: VmResources | None
    plan: BootPlan | None
    dirty_rings: DirtyRings | None
    notes: list[str]


class Machine(Closeable):
    """Run once with `run()`, then `close()` (or use `with`).

    Attributes for tools and tests: `kvm`, `vm`, `memory`, `vcpus`, `devices` (id ->
    device), `device_manager`, `serial`, `console`, `events`, `plan` (boot road),
    `description` (what a snapshot records of it).
    """

    def __init__(self, parts: MachineParts) -> None:
        self.control = parts.control
        self.kvm: Kvm | None = parts.kvm
        self.vm: Vm | None = parts.vm
        self.memory: GuestMemory | None = parts.memory
        self.vcpus = parts.vcpus
        self.device_manager = parts.devices
        self.events = parts.events
        self.console = parts.console
        self.description = parts.description
        self.resources = parts.resources
        self.plan = parts.plan
        self.dirty_rings = parts.dirty_rings
        self.notes = parts.notes  # what the build found worth telling (bzImage speed, ...)
        self.stopping = self.control.stopping
        self.attention = self.control.attention
        self.gate = self.control.gate
        self.operations = Operations(self.stopping)  # one at a time: machine/operations.py
        self.restored_from: str | None = None
        self.migrated_from: str | None = None
        self.restore_notes: list[str] = []
        self.lazy: MemoryFiller | None = None
        self.started_at: float | None = None
        self._threads: list[threading.Thread] = []
        self._halted: set[int] = set()
        self._lock = threading.Lock()
        self._watch: HaltWatch | None = None
        self._events_held = False
        self._closed = False
        self.control.kick_all = self._kick_all
        install_kick_handler()  # so a pause or stop reaches a vCPU spinning in the guest

    # -- what it is made of ------------------------------------------------------------
    @property
    def devices(self) -> dict[str, Device]:
        """Every device by id: the ones whose state a snapshot carries."""
        return self.device_manager.devices

    @property
    def serial(self) -> Serial16550:
        serial = self.devices["serial0"]
        assert isinstance(serial, Serial16550)
        return serial

    @property
    def post(self) -> PostCode:
        post = self.devices["post"]
        assert isinstance(post, PostCode)
        return post

    @property
    def pio_bus(self) -> Bus:
        return self.device_manager.pio_bus

    @property
    def mmio_bus(self) -> Bus:
        return self.device_manager.mmio_bus

    @property
    def irqchip(self) -> bool:
        return self.description.irqchip

    # -- running -------------------------------------------------------------------------
    def run(self) -> RunResult:
        """Run until the guest exits, every vCPU halts, an error, or Ctrl-C."""
        if self._threads or self._closed:
            raise RuntimeError("a Machine runs once; build a new one to run again")
        start = self.started_at = time.monotonic()
        ports: list[VcpuPort] = []
        with kick_handler():
            try:  # a signal while the run starts ends it as one during the run does
                ports.extend(self._port(v) for v in self.vcpus)
                self.gate.start([v.index for v in self.vcpus])
                if self.irqchip:
                    self._watch = HaltWatch(
                        len(self.vcpus), self._kick_one, self._all_idle, self.control.stopping
                    )
                enter_phase("run")
                self.events.start()
                for port in ports:
                    t = threading.Thread(
                        target=self._vcpu_thread,
                        args=(port,),
                        name=f"vcpu{port.index}",
                        daemon=True,
                    )
                    self._threads.append(t)
                    t.start()
                if self._watch is not None:
                    self._watch.start()
                malloc_trim()  # what the build freed goes back to the kernel
                while not self.stopping.wait(0.25):
                    pass
            except Terminated:
                self.stop(EXIT_TERMINATED, "terminated (SIGTERM)")
            except KeyboardInterrupt:
                self.stop(EXIT_INTERRUPTED, "interrupted (Ctrl-C)")
            started = [t for t in self._threads if t.ident is not None]  # a signal may cut start()
            for t in started:
                t.join(JOIN_TIMEOUT_S)
            stuck = [t.name for t in started if t.is_alive()]
            if stuck:
                self.stop(EXIT_HOST_ERROR, f"vCPU threads did not stop: {', '.join(stuck)}")
        wall = time.monotonic() - start
        self.console.flush()
        return self._finish(wall, [p.counts for p in ports])

    def _port(self, vcpu: Vcpu) -> VcpuPort:
        control, gate, watch_ref = self.control, self.gate, self
        attention, stopping = self.attention.is_set, self.stopping.is_set
        run_struct = vcpu.run_struct
        index = vcpu.index

        def on_kick() -> bool:
            if attention():
                if not gate.park(vcpu):
                    return False
            else:
                run_struct.immediate_exit = 0
                if attention():  # a pause came in between: leave KVM_RUN at once
                    run_struct.immediate_exit = 1
            watch = watch_ref._watch
            if watch is not None and watch.wants_check(index):
                watch.report(index, _idle_for_good(vcpu))
            return not stopping()

        def on_hlt() -> bool:
            self.vcpu_halted(index)
            return False

        def on_shutdown() -> bool:  # a Linux guest's last way to reboot
            control.guest_reset("triple fault")
            return False

        rings = self.dirty_rings
        return VcpuPort(
            index=index,
            run=vcpu.runner(),
            exits=vcpu.exit_decoder(),
            pio=self.pio_bus,
            mmio=self.mmio_bus,
            stopping=stopping,
            stop=control.stop,
            on_kick=on_kick,
            on_hlt=on_hlt,
            describe=lambda: _registers(vcpu),
            on_ring_full=(lambda: rings.harvest_full(index)) if rings is not None else None,
            device_faults=faults.active() is not None,
            ignore_unclaimed=self.description.unclaimed_io == "ignore",
            on_shutdown=on_shutdown if self.description.boot.kind == "linux" else None,
        )

    def _vcpu_thread(self, port: VcpuPort) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        if self._watch is not None:
            self._watch.tids[port.index] = threading.get_native_id()
        try:
            run_vcpu(port)
        finally:
            self.gate.gone(port.index)

    def _finish(self, wall: float, counts: list[list[int]]) -> RunResult:
        assert self.control.result is not None and self.memory is not None
        exits: dict[str, int] = {}
        for reason in range(NR_REASONS):
            n = sum(c[reason] for c in counts)
            if n:
                exits[ExitReason.name_of(reason)] = n
        r = self.control.result
        r.wall_s = wall
        r.exits = exits
        r.vcpus = len(self.vcpus)
        r.memory_bytes = self.memory.size_bytes
        r.backend = self.memory.backend_name
        r.backend_reason = self.memory.choice.reason
        r.host_mapped_bytes = self.memory.host_mapped_bytes
        r.populated_bytes = self.memory.populated_bytes()
        r.exposure = self.memory.exposure_report()
        r.memory_notes = list(self.memory.notes)
        r.console_bytes = self.serial.transmitted
        r.console_dropped = self.console.dropped
        return r

    # -- stopping ------------------------------------------------------------------------
    def stop(self, status: int, reason: str, detail: str = "") -> None:
        """End the run; the first call decides the result. Safe from any thread."""
        self.control.stop(status, reason, detail)

    def _kick_all(self) -> None:
        """Kick every vCPU, including ones whose thread has not started yet (their
        first KVM_RUN then returns at once)."""
        for i in range(len(self.vcpus)):
            self._kick_one(i)

    def _kick_one(self, index: int) -> None:
        me = threading.current_thread()
        t = self._threads[index] if index < len(self._threads) else None
        alive = t is not None and t is not me and t.is_alive()
        self.vcpus[index].kick(t.ident if alive and t is not None else None)

    def vcpu_halted(self, index: int) -> None:
        """A vCPU halted (a HLT exit, without an in-kernel LAPIC)."""
        with self._lock:
            self._halted.add(index)
            everyone = len(self._halted) == len(self.vcpus)
        if everyone:
            self.control.all_halted()

    def _all_idle(self) -> None:
        self.control.all_halted()

    # -- pause and resume (from a controller thread) -------------------------------------
    @property
    def running(self) -> bool:
        return bool(self._threads) and not self.stopping.is_set()

    @property
    def alive(self) -> bool:
        """Built and not ended: running, or about to (a pause or snapshot asked before
        `run()` starts the vCPUs holds them at their first KVM_RUN)."""
        return not self.stopping.is_set() and not self._closed

    @property
    def paused(self) -> bool:
        return self.gate.paused

    def request_pause(self, holder: str = USER) -> None:
        """Ask every vCPU to stop at its next clean point; does not wait (safe from a
        device handler running on a vCPU thread)."""
        enter_phase("pause")
        self.gate.hold(holder, self._kick_all)

    def pause(self, timeout_s: float = 10.0, holder: str = USER) -> None:
        """Stop every vCPU at a clean point (no exit half-done), and the event loop
        between callbacks, and wait for it. Pauses are held by `holder`: the machine
        runs again once every holder resumed it. The user's pause (holder "user") is
        an operation: refused (OperationRefused) while a migration, snapshot, pause or
        resume is in progress; other holders pause within their own operation."""
        if not self.alive:
            raise KvmkitError("the machine is not running, so it cannot be paused")
        if holder != USER:
            self._pause(holder, timeout_s)
            return
        with self.operations.begin(PAUSE):
            self._pause(holder, timeout_s)

    def _pause(self, holder: str, timeout_s: float) -> None:
        enter_phase("pause")
        try:
            self.gate.pause(holder, self._kick_all, timeout_s)
        finally:
            self._sync_events()

    def resume(self, holder: str = USER) -> bool:
        """Drop `holder`'s pause; False if it held none. The user's resume is an
        operation, refused as the user's pause is."""
        if holder != USER:
            return self._resume(holder)
        with self.operations.begin(RESUME):
            return self._resume(holder)

    def _resume(self, holder: str) -> bool:
        enter_phase("resume")
        released = self.gate.release(holder)
        self._sync_events()
        return released

    def _sync_events(self) -> None:
        """The event loop is held exactly while some holder pauses the vCPUs."""
        with self._lock:
            want = bool(self.gate.holders)
            if want and not self._events_held:
                self.events.hold()
            elif not want and self._events_held:
                self.events.release()
            self._events_held = want

    def status(self) -> dict[str, Any]:
        state = "stopped" if self.stopping.is_set() else "paused" if self.paused else "running"
        if not self._threads and state == "running":
            state = "created"
        assert self.memory is not None
        result = self.control.result
        return {
            "state": state,
            "vcpus": len(self.vcpus),
            "memory_bytes": self.memory.size_bytes,
            "backend": self.memory.backend_name,
            "populated_bytes": self.memory.populated_bytes(),
            "uptime_s": round(time.monotonic() - self.started_at, 3) if self.started_at else 0,
            "paused_by": self.gate.holders,
            "in_progress": self.operations.in_progress,
            "restored_from": self.restored_from,
            "migrated_from": self.migrated_from,
            "result": result.reason if result else None,
        }

    # -- teardown ------------------------------------------------------------------------
    def close(self) -> None:
        """Close every fd, mapping and thread this machine owns. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._threads and not self.stopping.is_set():
            self.stop(EXIT_OK, "closed")
        if not self.operations.wait_idle(OPERATION_END_TIMEOUT_S):
            # A snapshot or migration still reads guest memory (a write stuck on a slow
            # disk or peer): leave the memory mapped for the process's end, never free
            # it under the reader.
            self.memory = None
        if self.lazy is not None:
            self.lazy.close()
            self.lazy = None
        self.events.hold(1.0)  # no device callback runs while the devices close their fds
        self.device_manager.close()
        self.events.close()
        self.console.close()
        for vcpu in self.vcpus:
            vcpu.close()
        if self.memory is not None:
            self.memory.close()
            self.memory = None
        if self.vm is not None:
            self.vm.close()
            self.vm = None
        if self.kvm is not None:
            self.kvm.close()
            self.kvm = None


def _idle_for_good(vcpu: Vcpu) -> bool:
    """Halted with interrupts off, or an AP never started: nothing will wake it."""
    try:
        state = vcpu.get_mp_state()
        if state in WAITING_FOR_SIPI:
            return True
        return state == KVM_MP_STATE_HALTED and not vcpu.get_regs().rflags & RFLAGS_IF
    except KvmError:
        return False


def _registers(vcpu: Vcpu) -> str:
    try:
        return format_registers(vcpu.get_regs(), vcpu.get_sregs())
    except KvmError as e:
        return f"  (registers unavailable: {e})"
