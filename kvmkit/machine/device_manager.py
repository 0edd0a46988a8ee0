"""The device manager: every device of a machine, with its id, bus range and IRQ.

Adding a device is one call: `add_pio(device, base, length, gsi=...)` for a legacy
device at fixed ports, `add_mmio(device, size)` for one that gets the next MMIO slot
(virtio-mmio), each optionally with an interrupt line (a GSI from the pool, or a
fixed legacy IRQ). `ioeventfd(...)` gives a device a doorbell KVM completes without
an exit, served by the machine's event loop. A restored machine places each device
where the saved description says (`at=`), so the guest finds it where it left it.
"""

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from kvmkit.devices.bus import Bus, Device, mmio_bus, pio_bus
from kvmkit.devices.irq import IrqLine, LevelRecorder
from kvmkit.errors import KvmkitError
from kvmkit.kvm import Vm
from kvmkit.machine.event_loop import EventLoop
from kvmkit.machine.interrupts import GsiPool, IrqfdLine, KvmIrqLine

# virtio-mmio slots: 4 KiB each, in the MMIO hole below the IOAPIC (0xFEC00000).
MMIO_BASE = 0xD000_0000
MMIO_SLOT = 0x1000
MMIO_LIMIT = 0xFEC0_0000


@dataclass(frozen=True)
class Placement:
    """Where a device sits: its bus, range and interrupt line (None: no interrupt)."""

    id: str
    bus: Literal["pio", "mmio"]
    base: int
    length: int
    gsi: int | None


class MmioAllocator:
    """Hands out fixed-size MMIO slots, in order, within [base, limit)."""

    def __init__(self, base: int = MMIO_BASE, limit: int = MMIO_LIMIT) -> None:
        self.next = base
        self.limit = limit

    def take(self, size: int, owner: str) -> int:
        slots = -(-size // MMIO_SLOT)
        base = self.next
        if base + slots * MMIO_SLOT > self.limit:
            raise KvmkitError(f"{owner}: no MMIO space left for a device of {size} bytes")
        self.next = base + slots * MMIO_SLOT
        return base


class DeviceManager:
    """Owns the buses, the GSI pool, the MMIO allocator and the devices' ioeventfds
    and irqfds. `irqchip`: whether the VM has KVM's in-kernel PIC/IOAPIC (without one,
    devices get lines that only record their level)."""

    def __init__(self, vm: Vm, events: EventLoop, irqchip: bool) -> None:
        self.vm = vm
        self.events = events
        self.irqchip = irqchip
        self.pio_bus: Bus = pio_bus()
        self.mmio_bus: Bus = mmio_bus()
        self.gsis = GsiPool()
        self.mmio = MmioAllocator()
        self.devices: dict[str, Device] = {}
        self.placements: dict[str, Placement] = {}
        self._irqfds: list[IrqfdLine] = []
        self._eventfds: list[tuple[int, int, int, bool, int | None]] = []
        self._readers: list[int] = []

    # -- interrupt lines --------------------------------------------------------------
    def irq_line(self, owner: str, gsi: int | None = None, irqfd: bool = False) -> IrqLine:
        """An interrupt line for `owner`: the fixed `gsi`, or the next free one."""
        number = self.gsis.take(owner, gsi)
        if not self.irqchip:
            return LevelRecorder(number)
        if irqfd:
            line = IrqfdLine(self.vm, number)
            self._irqfds.append(line)
            return line
        return KvmIrqLine(self.vm, number)

    # -- adding devices ----------------------------------------------------------------
    def add_pio(self, device: Device, base: int, length: int, gsi: int | None = None) -> None:
        self._check_id(device)
        self.pio_bus.add(base, length, device)
        self._record(device, Placement(device.name, "pio", base, length, gsi))

    def add_mmio(
        self, device: Device, size: int, gsi: int | None = None, at: int | None = None
    ) -> int:
        """Map `device` at the next MMIO slot (or `at`, restoring); returns its base."""
        self._check_id(device)
        base = at if at is not None else self.mmio.take(size, device.name)
        self.mmio_bus.add(base, size, device)
        self._record(device, Placement(device.name, "mmio", base, size, gsi))
        return base

    def _check_id(self, device: Device) -> None:
        if device.name in self.devices:
            raise KvmkitError(f"two devices have the id {device.name!r}: give each its own")

    def _record(self, device: Device, placement: Placement) -> None:
        self.devices[device.name] = device
        self.placements[device.name] = placement

    # -- doorbells -----------------------------------------------------------------------
    def ioeventfd(
        self,
        owner: str,
        addr: int,
        length: int,
        on_ring: Callable[[], None],
        *,
        pio: bool = False,
        datamatch: int | None = None,
    ) -> int:
        """A doorbell: guest writes to `addr` (matching `datamatch`, if given) complete in
        KVM without an exit and run `on_ring` on the event loop. Returns the eventfd."""
        fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            self.vm.ioeventfd(fd, addr, length, pio=pio, datamatch=datamatch)
        except BaseException:
            os.close(fd)
            raise
        self._eventfds.append((fd, addr, length, pio, datamatch))

        def ring() -> None:
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(fd)
                on_ring()

        self.events.add_reader(fd, ring, owner)
        return fd

    def add_reader(self, owner: str, fd: int, callback: Callable[[], None]) -> None:
        """Run `callback` on the event loop when the device's host `fd` is readable
        (removed at close, before the device releases its fds)."""
        self.events.add_reader(fd, callback, owner)
        self._readers.append(fd)

    # -- teardown -------------------------------------------------------------------------
    def close(self) -> None:
        """Unbind and close every ioeventfd and irqfd (the VM must still be open)."""
        for fd in self._readers:
            self.events.remove_reader(fd)
        self._readers.clear()
        for fd, addr, length, pio, datamatch in self._eventfds:
            self.events.remove_reader(fd)
            with contextlib.suppress(KvmkitError):
                if self.vm.fd >= 0:
                    self.vm.ioeventfd(fd, addr, length, pio=pio, datamatch=datamatch, deassign=True)
            os.close(fd)
        self._eventfds.clear()
        for line in self._irqfds:
            with contextlib.suppress(KvmkitError):
                line.close()
        self._irqfds.clear()
        for device in self.devices.values():  # host fds a device holds (a disk file)
            release = getattr(device, "release", None)
            if release is not None:
                release()
