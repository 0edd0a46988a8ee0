"""`Vm`: a KVM VM fd: memory slots, guest_memfd, interrupts, dirty logs, vCPU creation."""

import ctypes
import errno
import os
from typing import TYPE_CHECKING, TypeVar

from kvmkit.closing import Closeable
from kvmkit.kvm.errors import KvmError
from kvmkit.kvm.ioctl import kvm_ioctl
from kvmkit.kvm.system import CapName, cap_number
from kvmkit.uapi import ioctls
from kvmkit.uapi.caps import Cap
from kvmkit.uapi.control import kvm_enable_cap, kvm_pmu_event_filter
from kvmkit.uapi.irq import (
    KVM_IOEVENTFD_FLAG_DATAMATCH,
    KVM_IOEVENTFD_FLAG_DEASSIGN,
    KVM_IOEVENTFD_FLAG_PIO,
    KVM_IRQFD_FLAG_DEASSIGN,
    kvm_clock_data,
    kvm_ioeventfd,
    kvm_irq_level,
    kvm_irqchip,
    kvm_irqfd,
    kvm_msi,
    kvm_pit_config,
    kvm_pit_state2,
)
from kvmkit.uapi.memory import (
    GUEST_MEMFD_FLAG_INIT_SHARED,
    GUEST_MEMFD_FLAG_MMAP,
    GUEST_MEMFD_FLAG_NO_DIRECT_MAP,
    kvm_clear_dirty_log,
    kvm_create_guest_memfd,
    kvm_dirty_log,
    kvm_memory_attributes,
    kvm_userspace_memory_region,
    kvm_userspace_memory_region2,
)

if TYPE_CHECKING:
    from kvmkit.kvm.system import Kvm
    from kvmkit.kvm.vcpu import Vcpu

S = TypeVar("S", bound=ctypes.Structure)

GUEST_MEMFD_FLAG_NAMES = {
    GUEST_MEMFD_FLAG_MMAP: "MMAP",
    GUEST_MEMFD_FLAG_INIT_SHARED: "INIT_SHARED",
    GUEST_MEMFD_FLAG_NO_DIRECT_MAP: "NO_DIRECT_MAP",
}


def describe_gmem_flags(mask: int) -> str:
    names = [name for bit, name in GUEST_MEMFD_FLAG_NAMES.items() if mask & bit]
    rest = mask & ~sum(GUEST_MEMFD_FLAG_NAMES)
    if rest:
        names.append(hex(rest))
    return "|".join(names) or "none"


class Vm(Closeable):
    """A VM fd. Created by `Kvm.create_vm`; closing it closes its vCPUs too."""

    def __init__(self, kvm: "Kvm", fd: int) -> None:
        self.kvm = kvm
        self.fd = fd
        self.vcpus: list[Vcpu] = []
        self.dirty_ring_bytes = 0  # per vCPU, once enable_dirty_ring() is done

    # -- lifecycle --------------------------------------------------------
    def close(self) -> None:
        for vcpu in self.vcpus:
            vcpu.close()
        self.vcpus.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # -- capabilities -----------------------------------------------------
    def check_extension(self, cap: CapName) -> int:
        """KVM_CHECK_EXTENSION on the VM fd (answers can differ per VM type)."""
        return kvm_ioctl(self.fd, ioctls.KVM_CHECK_EXTENSION, cap_number(cap))

    def enable_cap(self, cap: CapName, *args: int, flags: int = 0) -> None:
        ec = kvm_enable_cap(cap=cap_number(cap), flags=flags)
        for i, a in enumerate(args):
            ec.args[i] = a
        kvm_ioctl(self.fd, ioctls.KVM_ENABLE_CAP, ec)

    def enable_dirty_ring(self, size_bytes: int) -> str:
        """Give every vCPU created from now on a dirty ring of `size_bytes` (a power of
        two, at least a page; before the first vCPU). Prefers the ACQ_REL flavour;
        returns the capability's name. KVM_GET_DIRTY_LOG is refused afterwards."""
        for cap in (Cap.DIRTY_LOG_RING_ACQ_REL, Cap.DIRTY_LOG_RING):
            most = self.check_extension(cap)
            if most:
                if size_bytes > most:
                    raise KvmError(
                        "KVM_ENABLE_CAP",
                        errno.EINVAL,
                        f"a dirty ring of {size_bytes} bytes is above this host's {most}",
                    )
                self.enable_cap(cap, size_bytes)
                self.dirty_ring_bytes = size_bytes
                return f"KVM_CAP_{cap.name}"
        raise KvmError("KVM_ENABLE_CAP", errno.ENOTSUP, "this host has no KVM_CAP_DIRTY_LOG_RING")

    # -- vCPUs ------------------------------------------------------------
    def create_vcpu(self, vcpu_id: int) -> "Vcpu":
        from kvmkit.kvm.vcpu import Vcpu

        fd = kvm_ioctl(self.fd, ioctls.KVM_CREATE_VCPU, vcpu_id)
        try:
            vcpu = Vcpu(self, vcpu_id, fd, self.kvm.vcpu_mmap_size, self.dirty_ring_bytes)
        except BaseException:
            os.close(fd)
            raise
        self.vcpus.append(vcpu)
        return vcpu

    # -- memory -----------------------------------------------------------
    def set_user_memory_region(
        self, slot: int, gpa: int, size: int, userspace_addr: int, flags: int = 0
    ) -> None:
        region = kvm_userspace_memory_region(slot, flags, gpa, size, userspace_addr)
        kvm_ioctl(self.fd, ioctls.KVM_SET_USER_MEMORY_REGION, region)

    def set_user_memory_region2(
        self,
        slot: int,
        gpa: int,
        size: int,
        userspace_addr: int,
        flags: int = 0,
        guest_memfd: int = 0,
        guest_memfd_offset: int = 0,
    ) -> None:
        region = kvm_userspace_memory_region2(
            slot=slot,
            flags=flags,
            guest_phys_addr=gpa,
            memory_size=size,
            userspace_addr=userspace_addr,
            guest_memfd_offset=guest_memfd_offset,
            guest_memfd=guest_memfd,
        )
        kvm_ioctl(self.fd, ioctls.KVM_SET_USER_MEMORY_REGION2, region)

    def delete_memory_region(self, slot: int) -> None:
        """Remove a memory slot (a region of size 0), with whichever ioctl the host has."""
        if self.check_extension(Cap.USER_MEMORY2):
            self.set_user_memory_region2(slot, 0, 0, 0)
        else:
            self.set_user_memory_region(slot, 0, 0, 0)

    def guest_memfd_flags(self) -> int:
        """The guest_memfd flags this VM accepts (KVM_CAP_GUEST_MEMFD_FLAGS), 0 if none."""
        if not self.check_extension(Cap.GUEST_MEMFD):
            return 0
        return self.check_extension(Cap.GUEST_MEMFD_FLAGS)

    def create_guest_memfd(self, size: int, flags: int = 0) -> int:
        """KVM_CREATE_GUEST_MEMFD; returns the new fd (the caller owns and closes it)."""
        request = kvm_create_guest_memfd(size=size, flags=flags)
        try:
            return kvm_ioctl(self.fd, ioctls.KVM_CREATE_GUEST_MEMFD, request)
        except KvmError as e:
            if e.errno != errno.EINVAL:
                raise
            supported = self.guest_memfd_flags()
            if flags & ~supported:
                hint = (
                    f"flags {describe_gmem_flags(flags)} asked, this host supports"
                    f" {describe_gmem_flags(supported)}"
                )
            else:
                hint = f"size {size:#x} must be a non-zero multiple of the page size"
            raise KvmError(e.ioctl, e.errno, hint) from None

    def set_memory_attributes(self, gpa: int, size: int, attributes: int) -> None:
        kvm_ioctl(
            self.fd,
            ioctls.KVM_SET_MEMORY_ATTRIBUTES,
            kvm_memory_attributes(address=gpa, size=size, attributes=attributes),
        )

    def get_dirty_log(self, slot: int, npages: int) -> bytearray:
        """The slot's dirty bitmap: one bit per page, little-endian bit order."""
        bitmap = (ctypes.c_uint64 * ((npages + 63) // 64))()
        kvm_ioctl(
            self.fd,
            ioctls.KVM_GET_DIRTY_LOG,
            kvm_dirty_log(slot=slot, dirty_bitmap=ctypes.addressof(bitmap)),
        )
        return bytearray(bitmap)

    def clear_dirty_log(self, slot: int, first_page: int, bitmap: bytes) -> None:
        buf = (ctypes.c_uint8 * len(bitmap)).from_buffer_copy(bitmap)
        kvm_ioctl(
            self.fd,
            ioctls.KVM_CLEAR_DIRTY_LOG,
            kvm_clear_dirty_log(
                slot=slot,
                num_pages=len(bitmap) * 8,
                first_page=first_page,
                dirty_bitmap=ctypes.addressof(buf),
            ),
        )

    def reset_dirty_rings(self) -> int:
        return kvm_ioctl(self.fd, ioctls.KVM_RESET_DIRTY_RINGS)

    # -- x86 platform -----------------------------------------------------
    def set_tss_addr(self, gpa: int) -> None:
        kvm_ioctl(self.fd, ioctls.KVM_SET_TSS_ADDR, gpa)

    def set_identity_map_addr(self, gpa: int) -> None:
        kvm_ioctl(self.fd, ioctls.KVM_SET_IDENTITY_MAP_ADDR, ctypes.c_uint64(gpa))

    def create_irqchip(self) -> None:
        kvm_ioctl(self.fd, ioctls.KVM_CREATE_IRQCHIP)

    def create_pit2(self, flags: int = 0) -> None:
        kvm_ioctl(self.fd, ioctls.KVM_CREATE_PIT2, kvm_pit_config(flags=flags))

    def irq_line(self, irq: int, level: int) -> None:
        kvm_ioctl(self.fd, ioctls.KVM_IRQ_LINE, kvm_irq_level(irq=irq, level=level))

    def signal_msi(self, address: int, data: int) -> int:
        msi = kvm_msi(address_lo=address & 0xFFFFFFFF, address_hi=address >> 32, data=data)
        return kvm_ioctl(self.fd, ioctls.KVM_SIGNAL_MSI, msi)

    def irqfd(self, fd: int, gsi: int, *, deassign: bool = False) -> None:
        flags = KVM_IRQFD_FLAG_DEASSIGN if deassign else 0
        kvm_ioctl(self.fd, ioctls.KVM_IRQFD, kvm_irqfd(fd=fd, gsi=gsi, flags=flags))

    def ioeventfd(
        self,
        fd: int,
        addr: int,
        length: int,
        *,
        pio: bool = False,
        datamatch: int | None = None,
        deassign: bool = False,
    ) -> None:
        flags = (KVM_IOEVENTFD_FLAG_PIO if pio else 0) | (
            KVM_IOEVENTFD_FLAG_DEASSIGN if deassign else 0
        )
        if datamatch is not None:
            flags |= KVM_IOEVENTFD_FLAG_DATAMATCH
        request = kvm_ioeventfd(datamatch=datamatch or 0, addr=addr, len=length, fd=fd, flags=flags)
        kvm_ioctl(self.fd, ioctls.KVM_IOEVENTFD, request)

    def set_pmu_event_filter(
        self, action: int, events: list[int], fixed_counter_bitmap: int = 0, flags: int = 0
    ) -> None:
        header = kvm_pmu_event_filter(
            action=action,
            nevents=len(events),
            fixed_counter_bitmap=fixed_counter_bitmap,
            flags=flags,
        )
        size = ctypes.sizeof(header) + 8 * len(events)
        buf = (ctypes.c_uint8 * size)()
        ctypes.memmove(buf, ctypes.byref(header), ctypes.sizeof(header))
        words = (ctypes.c_uint64 * len(events)).from_buffer(buf, ctypes.sizeof(header))
        for i, event in enumerate(events):
            words[i] = event
        kvm_ioctl(self.fd, ioctls.KVM_SET_PMU_EVENT_FILTER, buf)

    def _get(self, request: int, cls: type[S], **init: int) -> S:
        value = cls(**init)
        kvm_ioctl(self.fd, request, value)
        return value

    def get_clock(self) -> kvm_clock_data:
        return self._get(ioctls.KVM_GET_CLOCK, kvm_clock_data)

    def set_clock(self, clock: kvm_clock_data) -> None:
        kvm_ioctl(self.fd, ioctls.KVM_SET_CLOCK, clock)

    def get_irqchip(self, chip_id: int) -> kvm_irqchip:
        return self._get(ioctls.KVM_GET_IRQCHIP, kvm_irqchip, chip_id=chip_id)

    def set_irqchip(self, chip: kvm_irqchip) -> None:
        kvm_ioctl(self.fd, ioctls.KVM_SET_IRQCHIP, chip)

    def get_pit2(self) -> kvm_pit_state2:
        return self._get(ioctls.KVM_GET_PIT2, kvm_pit_state2)

    def set_pit2(self, state: kvm_pit_state2) -> None:
        kvm_ioctl(self.fd, ioctls.KVM_SET_PIT2, state)
