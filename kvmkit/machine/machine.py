"""`Machine`: a VM built from a `MachineConfig`, one thread per vCPU, devices, lifecycle."""

import signal
import sys
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from kvmkit.devices import DebugExit, PostCode, Serial16550, mmio_bus, pio_bus
from kvmkit.devices.debug_exit import DEBUG_EXIT_LEN, DEBUG_EXIT_PORT
from kvmkit.devices.post import POST_PORT
from kvmkit.devices.serial import COM1_BASE, UART_REGS
from kvmkit.guests.abi import BOOT_FLAG_PVM_HOST
from kvmkit.kvm import Kvm, KvmUnsupportedError, Vcpu, Vm
from kvmkit.kvm.vcpu import kick_handler
from kvmkit.machine.boot import BootPlan, load_long_mode, load_real_mode, setup_vcpu
from kvmkit.machine.config import MachineConfig
from kvmkit.machine.probes import guest_memfd_runs_unmapped
from kvmkit.machine.result import (
    EXIT_HOST_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    RunResult,
)
from kvmkit.machine.vcpu_loop import _NR_REASONS, run_vcpu
from kvmkit.memory import GuestMemory
from kvmkit.uapi.caps import Cap
from kvmkit.uapi.exits import ExitReason

JOIN_TIMEOUT_S = 5.0


class Machine:
    """Build with `Machine(config)`, then `run()` once, then `close()` (or use `with`).

    Attributes for tests and tools: `kvm`, `vm`, `memory`, `vcpus`, `plan`,
    `serial`, `post`, `pio_bus`, `mmio_bus`.
    """

    def __init__(self, config: MachineConfig, console: BinaryIO | None = None) -> None:
        self.config = config
        self.kvm: Kvm | None = None
        self.vm: Vm | None = None
        self.memory: GuestMemory | None = None
        self.vcpus: list[Vcpu] = []
        self._console_file: BinaryIO | None = None
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._result: RunResult | None = None
        self._halted: set[int] = set()
        self._threads: list[threading.Thread] = []
        try:
            self._build(console)
        except BaseException:
            self.close()
            raise

    # -- building ---------------------------------------------------------
    def _build(self, console: BinaryIO | None) -> None:
        config = self.config
        self.kvm = Kvm()
        config.validate(max_vcpus=self.kvm.check_extension(Cap.MAX_VCPUS))
        image = self._guest_image()
        self.vm = self.kvm.create_vm()
        self.memory = GuestMemory(
            self.vm,
            config.memory_bytes,
            config.memory_backend,
            hugepage_size=config.hugepage_size,
            numa=config.numa,
            prealloc=config.prealloc,
            no_direct_map=config.hide == "direct-map",
        )
        if config.cpu_mode == "long":
            flags = BOOT_FLAG_PVM_HOST if self.kvm.is_pvm else 0
            self.plan: BootPlan = load_long_mode(
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

        if config.hide != "off":
            self._hide_guest_memory()

        supported = self.kvm.supported_cpuid()
        for i in range(config.vcpus):
            vcpu = self.vm.create_vcpu(i)
            self.vcpus.append(vcpu)
            setup_vcpu(vcpu, self.plan, supported)

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
        start = time.monotonic()
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
        self._kick_all()

    def _kick_all(self) -> None:
        me = threading.current_thread()
        for vcpu, t in zip(self.vcpus, self._threads, strict=False):
            vcpu.kick(t.ident if t is not me and t.is_alive() else None)

    def vcpu_halted(self, index: int) -> None:
        with self._lock:
            self._halted.add(index)
            everyone = len(self._halted) == len(self.vcpus)
        if everyone:
            self.stop(EXIT_OK, "all vCPUs halted")

    def _guest_exit(self, value: int) -> None:
        self.stop(value & 0xFF, f"guest exited with status {value}")

    # -- teardown ---------------------------------------------------------
    def close(self) -> None:
        """Close every fd and mapping this machine opened. Idempotent."""
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
