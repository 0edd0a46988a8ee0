"""Interrupt lines into KVM's in-kernel irqchip, and the pool of GSIs devices draw from.

- `KvmIrqLine`: KVM_IRQ_LINE on a GSI, driven only when the level changes; what a
  legacy device (the UART on IRQ 4) uses, edge or level as its IOAPIC/PIC pin is set.
- `IrqfdLine`: an eventfd bound to a GSI with KVM_IRQFD; `pulse()` is one write to
  the eventfd, and KVM injects without an ioctl from kvmkit (virtio's used-buffer
  interrupt takes this road).
Without an in-kernel irqchip nothing can take an interrupt: devices get a
`kvmkit.devices.irq.LevelRecorder` instead.
"""

import os

from kvmkit.errors import KvmkitError
from kvmkit.kvm import Vm

# GSIs 0-15 are the ISA IRQs (0 timer, 1 keyboard, 2 cascade, 4 COM1, 8 RTC); the
# IOAPIC has 24 pins. Devices that are not legacy get one of these.
POOL_GSIS = (5, 6, 7, 9, 10, 11, 12, 14, 15, *range(16, 24))


class GsiPool:
    """Hands out GSIs: a device asks for a fixed one (a legacy IRQ) or the next free."""

    def __init__(self, free: tuple[int, ...] = POOL_GSIS) -> None:
        self.free = list(free)
        self.taken: dict[int, str] = {}

    def take(self, owner: str, gsi: int | None = None) -> int:
        if gsi is None:
            if not self.free:
                raise KvmkitError(
                    f"{owner}: no interrupt line left ({len(self.taken)} in use, the IOAPIC"
                    " has 24): give the machine fewer devices"
                )
            gsi = self.free[0]
        if gsi in self.taken:
            raise KvmkitError(f"{owner}: IRQ {gsi} is already {self.taken[gsi]}'s")
        if gsi in self.free:
            self.free.remove(gsi)
        self.taken[gsi] = owner
        return gsi


class KvmIrqLine:
    def __init__(self, vm: Vm, gsi: int) -> None:
        self.vm = vm
        self.gsi = gsi
        self.level = False

    def set_level(self, high: bool) -> None:
        self.level = high
        self.vm.irq_line(self.gsi, 1 if high else 0)

    def pulse(self) -> None:
        self.vm.irq_line(self.gsi, 1)
        self.vm.irq_line(self.gsi, 0)


class IrqfdLine:
    """An eventfd KVM listens on (KVM_IRQFD): `pulse()` injects one edge."""

    def __init__(self, vm: Vm, gsi: int) -> None:
        self.vm = vm
        self.gsi = gsi
        self.fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            vm.irqfd(self.fd, gsi)
        except BaseException:
            os.close(self.fd)
            raise

    def set_level(self, high: bool) -> None:
        if high:
            self.pulse()

    def pulse(self) -> None:
        os.eventfd_write(self.fd, 1)

    def close(self) -> None:
        if self.fd >= 0:
            if self.vm.fd >= 0:
                self.vm.irqfd(self.fd, self.gsi, deassign=True)
            os.close(self.fd)
            self.fd = -1
