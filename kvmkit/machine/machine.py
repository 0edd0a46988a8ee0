"""`Machine`: a VM built from a `MachineConfig`, one thread per vCPU, devices, lifecycle."""

import os
import signal
import sys
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

from kvmkit.devices import DebugExit, Device, PostCode, Serial16550, mmio_bus, pio_bus
from kvmkit.devices.debug_exit import DEBUG_EXIT_LEN, DEBUG_EXIT_PORT
from kvmkit.devices.pace import PACE_PORT, PaceClock
from kvmkit.devices.post import POST_PORT
from kvmkit.devices.serial import COM1_BASE, UART_REGS
from kvmkit.errors import KvmkitError
from kvmkit.faults import enter_phase
from kvmkit.guests.abi import BOOT_FLAG_PVM_HOST
from kvmkit.kvm import Kvm, KvmUnsupportedError, Vcpu, Vm
from kvmkit.kvm.vcpu import install_kick_handler, kick_handler
from kvmkit.machine.boot import BootPlan, load_long_mode, load_real_mode, setup_vcpu
from kvmkit.machine.config import MachineConfig
from kvmkit.machine.pause import PauseGate
from kvmkit.machine.probes import guest_memfd_runs_unmapped
from kvmkit.machine.result import (
    EXIT_HOST_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    RunResult,
)
from kvmkit.machine.vcpu_loop import _NR_REASONS, run_vcpu
from kvmkit.memory import GuestMemory
from kvmkit.memory.dirty_ring import DirtyRings
from kvmkit.memory.layout import format_size
from kvmkit.snapshot import file as snapshot_file
from kvmkit.snapshot.file import SnapshotReport
from kvmkit.snapshot.lazy import LazyRestore, start_lazy_restore
from kvmkit.snapshot.machine_state import (
    ProgressFn,
    SavedMachine,
    apply_machine,
    check_host,
    check_layout,
    read_memory,
)
from kvmkit.uapi.caps import Cap
from kvmkit.uapi.exits import ExitReason

JOIN_TIMEOUT_S = 5.0


def config_from_description(
    m: dict[str, Any], backend: str | None = None, console: str | None = None
) -> MachineConfig:
    """The MachineConfig that rebuilds a machine a snapshot or migration describes."""
    return MachineConfig(
        memory_bytes=int(m["memory_bytes"]),
        vcpus=int(m["vcpus"]),
        memory_backend=backend or str(m["backend"]),
        guest=str(m["guest"]),
        guest_arg=int(m["guest_arg"]),
        hugepage_size=int(m["hugepage_size"]),
        irqchip=bool(m["irqchip"]),
        console=console,
    )


class Machine:
    """Build with `Machine(config)`, then `run()` once, then `close()` (or use `with`).

    Attributes for tests and tools: `kvm`, `vm`, `memory`, `vcpus`, `plan`,
    `serial`, `post`, `pio_bus`, `mmio_bus`.
    """

    def __init__(
        self,
        config: MachineConfig,
        console: BinaryIO | None = None,
        saved: SavedMachine | None = None,
    ) -> None:
        """`saved`: build the machine to continue a snapshot's state instead of booting
        the guest (its memory is loaded by the caller: see `Machine.restore`)."""
        self.config = config
        self.kvm: Kvm | None = None
        self.vm: Vm | None = None
        self.memory: GuestMemory | None = None
        self.vcpus: list[Vcpu] = []
        self._console_file: BinaryIO | None = None
        self.stopping = threading.Event()
        self.attention = threading.Event()  # stop or pause: vCPU threads check on EINTR
        self.gate = PauseGate(self.attention, self.stopping)
        self.plan: BootPlan | None = None
        self.restored_from: str | None = None
        self.restore_notes: list[str] = []
        self.lazy: LazyRestore | None = None
        self.started_at: float | None = None
        self._lock = threading.Lock()
        self._result: RunResult | None = None
        self._halted: set[int] = set()
        self._threads: list[threading.Thread] = []
        self.dirty_rings: DirtyRings | None = None
        install_kick_handler()  # so a pause or stop reaches a vCPU spinning in the guest
        try:
            self._build(console, saved)
        except BaseException:
            self.close()
            raise

    # -- building ---------------------------------------------------------
    def _build(self, console: BinaryIO | None, saved: SavedMachine | None) -> None:
        config = self.config
        self.kvm = Kvm()
        config.validate(
            max_vcpus=self.kvm.check_extension(Cap.MAX_VCPUS), restoring=saved is not None
        )
        image = self._guest_image() if saved is None else b""
        self.vm = self.kvm.create_vm()
        if config.dirty_ring_bytes:  # before the first vCPU
            self.vm.enable_dirty_ring(config.dirty_ring_bytes)
        if config.irqchip:
            self.vm.create_irqchip()
            self.vm.create_pit2()
        self.memory = GuestMemory(
            self.vm,
            config.memory_bytes,
            config.memory_backend,
            hugepage_size=config.hugepage_size,
            numa=config.numa,
            prealloc=config.prealloc,
            no_direct_map=config.hide == "direct-map",
        )
        if saved is not None:
            check_layout(saved.machine, self.memory)
        elif config.cpu_mode == "long":
            flags = BOOT_FLAG_PVM_HOST if self.kvm.is_pvm else 0
            self.plan = load_long_mode(
                self.memory, image, config.load_addr, config.vcpus, config.guest_arg, flags
            )
        else:
            self.plan = load_real_mode(self.memory, image, config.load_addr)

        self.pio_bus = pio_bus()
        self.mmio_bus = mmio_bus()
        self.serial = Serial16550(self._open_console(console))
        self.post = PostCode()
        self.debug_exit = DebugExit(self._guest_exit)
        self.pio_bus.add(COM1_BASE, UART_REGS, self.serial)
        self.pio_bus.add(POST_PORT, 1, self.post)
        self.pio_bus.add(DEBUG_EXIT_PORT, DEBUG_EXIT_LEN, self.debug_exit)
        self.pace = PaceClock()
        self.pio_bus.add(PACE_PORT, 1, self.pace)

        if config.hide != "off":
            self._hide_guest_memory()

        supported = self.kvm.supported_cpuid()
        for i in range(config.vcpus):
            vcpu = self.vm.create_vcpu(i)
            self.vcpus.append(vcpu)
            if self.plan is not None:
                setup_vcpu(vcpu, self.plan, supported)
        if config.dirty_ring_bytes:
            self.dirty_rings = DirtyRings(self.vm, {r.slot: r.offset for r in self.memory.regions})
        if saved is not None and saved.vcpus:  # an incoming migration loads state later
            apply_machine(saved, self.vm, self.vcpus, self.devices)

    def _hide_guest_memory(self) -> None:
        """Unmap guest RAM from this process, keeping only windows devices declare."""
        assert self.kvm is not None and self.memory is not None
        probe = guest_memfd_runs_unmapped()
        if not probe.ok:
            why = (
                "; on a PVM host KVM reaches guest memory through the host mapping"
                if self.kvm.is_pvm
                else ""
            )
            raise KvmUnsupportedError(
                "--hide-guest-memory",
                "this host's KVM cannot run a guest from guest_memfd without a host mapping"
                f" (measured: {probe.detail}){why}",
            )
        keep = []
        for bus in (self.pio_bus, self.mmio_bus):
            for mapping in bus.mappings():
                declared = getattr(mapping.device, "shared_windows", None)
                for gpa, size in declared() if declared else []:
                    keep.append((gpa, size, mapping.device.name))
        self.memory.hide(keep)

    def _guest_image(self) -> bytes:
        if self.config.program is not None:
            return self.config.program.build()
        return Path(self.config.guest).read_bytes()

    def _open_console(self, console: BinaryIO | None) -> BinaryIO | None:
        if console is not None:
            return console
        target = self.config.console
        if target == "none":
            return None
        if target is None:
            return sys.stdout.buffer
        self._console_file = open(target, "wb")  # noqa: SIM115 (closed in close())
        return self._console_file

    # -- running ----------------------------------------------------------
    def run(self) -> RunResult:
        """Run until the guest exits, every vCPU halts, an error, or Ctrl-C."""
        if self._threads:
            raise RuntimeError("a Machine runs once; build a new one to run again")
        counts = [[0] * _NR_REASONS for _ in self.vcpus]
        start = self.started_at = time.monotonic()
        self.gate.start([v.index for v in self.vcpus])
        enter_phase("run")
        with kick_handler():
            for vcpu, c in zip(self.vcpus, counts, strict=True):
                t = threading.Thread(
                    target=self._vcpu_thread, args=(vcpu, c), name=f"vcpu{vcpu.index}", daemon=True
                )
                self._threads.append(t)
                t.start()
            try:
                while not self.stopping.wait(0.25):
                    pass
            except KeyboardInterrupt:
                self.stop(EXIT_INTERRUPTED, "interrupted (Ctrl-C)")
            for t in self._threads:
                t.join(JOIN_TIMEOUT_S)
            stuck = [t.name for t in self._threads if t.is_alive()]
            if stuck:
                self.stop(EXIT_HOST_ERROR, f"vCPU threads did not stop: {', '.join(stuck)}")
        wall = time.monotonic() - start
        self.serial.flush()
        return self._finish(wall, counts)

    def _vcpu_thread(self, vcpu: Vcpu, counts: list[int]) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        run_vcpu(self, vcpu, counts)

    def _finish(self, wall: float, counts: list[list[int]]) -> RunResult:
        assert self._result is not None and self.memory is not None
        exits: dict[str, int] = {}
        for reason in range(_NR_REASONS):
            n = sum(c[reason] for c in counts)
            if n:
                exits[ExitReason.name_of(reason)] = n
        r = self._result
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
        return r

    # -- stopping (called from vCPU threads) --------------------------------
    def stop(self, status: int, reason: str, detail: str = "") -> None:
        """End the run; the first call decides the result. Safe from any thread."""
        with self._lock:
            if self._result is not None:
                return
            self._result = RunResult(status=status, reason=reason, detail=detail)
        self.stopping.set()
        self.attention.set()
        self.gate.wake()
        self._kick_all()

    def _kick_all(self) -> None:
        """Kick every vCPU, including ones whose thread has not started yet (their
        first KVM_RUN then returns at once)."""
        me = threading.current_thread()
        threads: list[threading.Thread | None] = [*self._threads]
        threads += [None] * (len(self.vcpus) - len(threads))
        for vcpu, t in zip(self.vcpus, threads, strict=True):
            vcpu.kick(t.ident if t is not None and t is not me and t.is_alive() else None)

    def vcpu_halted(self, index: int) -> None:
        with self._lock:
            self._halted.add(index)
            everyone = len(self._halted) == len(self.vcpus)
        if everyone:
            self.stop(EXIT_OK, "all vCPUs halted")

    def _guest_exit(self, value: int) -> None:
        self.stop(value & 0xFF, f"guest exited with status {value}")

    # -- pause, resume, state (called from a controller thread) -------------
    @property
    def devices(self) -> dict[str, Device]:
        """Every device by name: the ones whose state a snapshot carries."""
        found: dict[str, Device] = {}
        for bus in (self.pio_bus, self.mmio_bus):
            for mapping in bus.mappings():
                found[mapping.device.name] = mapping.device
        return found

    @property
    def running(self) -> bool:
        return bool(self._threads) and not self.stopping.is_set()

    @property
    def paused(self) -> bool:
        return self.gate.paused

    def request_pause(self) -> None:
        """Ask every vCPU to stop at its next clean point; does not wait (safe from a
        device handler running on a vCPU thread)."""
        enter_phase("pause")
        self.gate.request(self._kick_all)

    def pause(self, timeout_s: float = 10.0) -> None:
        """Stop every vCPU at a clean point (no exit half-done) and wait for it."""
        if not self.running:
            raise KvmkitError("the machine is not running, so it cannot be paused")
        enter_phase("pause")
        self.gate.pause(self._kick_all, timeout_s)

    def resume(self) -> None:
        enter_phase("resume")
        self.gate.resume()

    def status(self) -> dict[str, Any]:
        state = "stopped" if self.stopping.is_set() else "paused" if self.paused else "running"
        if not self._threads and state == "running":
            state = "created"
        assert self.memory is not None
        return {
            "state": state,
            "vcpus": len(self.vcpus),
            "memory_bytes": self.memory.size_bytes,
            "backend": self.memory.backend_name,
            "populated_bytes": self.memory.populated_bytes(),
            "uptime_s": round(time.monotonic() - self.started_at, 3) if self.started_at else 0,
            "restored_from": self.restored_from,
            "result": self._result.reason if self._result else None,
        }

    def state_description(self) -> dict[str, Any]:
        """What a snapshot records about this machine besides KVM and device state."""
        assert self.memory is not None
        c = self.config
        return {
            "memory_bytes": self.memory.size_bytes,
            "vcpus": len(self.vcpus),
            "backend": self.memory.backend_name,
            "hugepage_size": c.hugepage_size,
            "guest": c.guest,
            "guest_arg": c.guest_arg,
            "mode": c.cpu_mode,
            "irqchip": c.irqchip,
            "pit": c.irqchip,
            "regions": [[r.slot, r.gpa, r.size, r.offset] for r in self.memory.regions],
            "summary": (
                f"{len(self.vcpus)} vCPU, {format_size(self.memory.size_bytes)}"
                f" {self.memory.backend_name}, guest {c.guest}"
            ),
        }

    def snapshot(
        self,
        path: str | os.PathLike[str],
        *,
        resume: bool = False,
        compress_level: int | None = None,
        progress: ProgressFn | None = None,
    ) -> SnapshotReport:
        """Pause, write a snapshot, then resume if `resume` (else stay paused). If
        writing fails, the machine returns to how it was (running or paused) and no
        file is left."""
        enter_phase("snapshot")
        if self.memory is not None and self.memory.hidden:
            raise KvmUnsupportedError(
                "snapshot", "guest memory is hidden from kvmkit, so it cannot be saved"
            )
        if self.lazy is not None:
            self.lazy.finish()  # a snapshot needs every page of the one it came from
        was_paused = self.paused
        self.pause()
        try:
            self.serial.flush()
            report = snapshot_file.save(path, self, compress_level, progress)
        except BaseException:
            if not was_paused:
                self.resume()
            raise
        if resume:
            self.resume()
        return report

    @classmethod
    def restore(
        cls,
        path: str | os.PathLike[str],
        *,
        memory_backend: str | None = None,
        console: str | None = None,
        console_stream: BinaryIO | None = None,
        lazy: bool = False,
        prefetch: bool = True,
        progress: ProgressFn | None = None,
    ) -> "Machine":
        """A machine that continues the snapshot at `path` when `run()`. Every section
        is verified before the machine is built or any guest code runs."""
        enter_phase("restore")
        snap = snapshot_file.SnapshotFile(path)
        try:
            saved = snap.saved
            m = saved.machine
            backend = memory_backend or str(m["backend"])
            with Kvm() as kvm:
                warnings = check_host(saved.header, kvm, backend, f"snapshot {path}")
            config = config_from_description(m, backend, console)
            machine = cls(config, console_stream, saved=saved)
            try:
                assert machine.memory is not None
                if lazy:
                    machine.lazy = start_lazy_restore(snap, machine.memory, prefetch)
                    snap = None  # the lazy loader owns the file now
                    machine.lazy.on_error = lambda why: machine.stop(EXIT_HOST_ERROR, why)
                else:
                    read_memory(snap.reader, machine.memory, saved.memory_index, progress)
            except BaseException:
                machine.close()
                raise
            machine.restored_from = str(path)
            machine.restore_notes = warnings
            return machine
        finally:
            if snap is not None:
                snap.close()

    def load_state(self, saved: SavedMachine) -> None:
        """Load VM, vCPU and device state into a machine built for an incoming
        migration (`Machine(config, saved=<description only>)`), before `run()`."""
        assert self.vm is not None
        apply_machine(saved, self.vm, self.vcpus, self.devices)

    # -- teardown ---------------------------------------------------------
    def close(self) -> None:
        """Close every fd and mapping this machine opened. Idempotent."""
        if self.lazy is not None:
            self.lazy.close()
            self.lazy = None
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
        if self._console_file is not None:
            self._console_file.close()
            self._console_file = None

    def __enter__(self) -> "Machine":
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
