"""Where guest RAM lives: one host file per machine, bound to KVM memory slots.

- `guest_memfd` (default): KVM_CREATE_GUEST_MEMFD with MMAP|INIT_SHARED.
- `memfd`: a plain shmem memfd, where a host cannot map guest_memfd.
- `hugetlb`: a memfd with MFD_HUGETLB (2 MiB or 1 GiB pages from the hugetlb pool).
- `thp`: a memfd whose mapping is advised MADV_HUGEPAGE (shmem transparent hugepages).

A backend owns the file; `GuestMemory` owns every host mapping of it.
"""

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from kvmkit import libc
from kvmkit.errors import KvmkitError
from kvmkit.kvm import KvmError, KvmUnsupportedError, Vm
from kvmkit.kvm.vm import describe_gmem_flags
from kvmkit.memory.hugepages import check_pool, shmem_thp_mode, size_label
from kvmkit.memory.layout import PAGE_SIZE, RamRegion
from kvmkit.uapi.caps import Cap
from kvmkit.uapi.memory import (
    GUEST_MEMFD_FLAG_INIT_SHARED,
    GUEST_MEMFD_FLAG_MMAP,
    GUEST_MEMFD_FLAG_NO_DIRECT_MAP,
    KVM_MEM_GUEST_MEMFD,
    KVM_MEM_LOG_DIRTY_PAGES,
)

BACKEND_NAMES = ("guest_memfd", "memfd", "hugetlb", "thp")
GMEM_FLAGS = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED
# Flags whose meaning the 6.18 uAPI (plus the direct-map series kvmkit follows) settles.
KNOWN_GMEM_FLAGS = GMEM_FLAGS | GUEST_MEMFD_FLAG_NO_DIRECT_MAP
# No guest_memfd hugepage flag has a settled value yet: the proposals reuse bit 2.
# When one lands in the uAPI, set it here; kvmkit then uses it when the capability offers it.
GUEST_MEMFD_HUGEPAGE_FLAG: int | None = None


class Backend:
    """A file holding all guest RAM. `page_size` is its allocation unit: discards and
    the memory size must be multiples of it."""

    name: ClassVar[str]
    page_size: int = PAGE_SIZE
    map_flags: int = libc.MAP_NORESERVE
    # Can KVM run the guest with no host mapping of this file? (guest_memfd only)
    can_hide: ClassVar[bool] = False

    def __init__(self, fd: int, size_bytes: int) -> None:
        self.fd = fd
        self.size_bytes = size_bytes
        self.notes: list[str] = []

    def bind(self, vm: Vm, slot: int, gpa: int, size: int, offset: int, uaddr: int) -> None:
        raise NotImplementedError

    # How a bound slot is switched to dirty logging and back (GuestMemory.log_dirty).
    logging_method = "slot flag"

    def set_logging(
        self, vm: Vm, region: RamRegion, uaddr: int, on: bool, repair: bool = False
    ) -> None:
        """KVM_MEM_LOG_DIRTY_PAGES on or off for a bound slot: a flags change. `repair`:
        putting a slot back after a failed change (it may be missing)."""
        flags = KVM_MEM_LOG_DIRTY_PAGES if on else 0
        r = region
        if vm.check_extension(Cap.USER_MEMORY2):
            vm.set_user_memory_region2(r.slot, r.gpa, r.size, uaddr, flags)
        else:
            vm.set_user_memory_region(r.slot, r.gpa, r.size, uaddr, flags)

    def after_map(self, addr: int, size: int) -> None:
        """Called once the VMM's main mapping exists, before anything touches it."""

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class GuestMemfdBackend(Backend):
    name = "guest_memfd"
    can_hide = True

    def __init__(self, vm: Vm, size_bytes: int, extra_flags: int = 0) -> None:
        self.flags = GMEM_FLAGS | extra_flags
        super().__init__(vm.create_guest_memfd(size_bytes, self.flags), size_bytes)
        self.notes.append(f"guest_memfd flags {describe_gmem_flags(self.flags)}")

    def bind(self, vm: Vm, slot: int, gpa: int, size: int, offset: int, uaddr: int) -> None:
        # userspace_addr is the VMM's mapping of the same pages, or 0 when hidden:
        # upstream KVM faults an mmap-able guest_memfd slot from the file itself.
        vm.set_user_memory_region2(
            slot,
            gpa,
            size,
            uaddr,
            flags=KVM_MEM_GUEST_MEMFD,
            guest_memfd=self.fd,
            guest_memfd_offset=offset,
        )

    logging_method = "plain slots over the guest_memfd mapping"

    def set_logging(
        self, vm: Vm, region: RamRegion, uaddr: int, on: bool, repair: bool = False
    ) -> None:
        """KVM refuses KVM_MEM_LOG_DIRTY_PAGES on a guest_memfd slot (EINVAL on 6.18),
        so logging swaps the slot for a plain one over the VMM's mapping of the same
        guest_memfd pages (nothing is copied), and back. When repairing a half-done
        swap the slot may already be gone."""
        r = region
        if repair:
            with contextlib.suppress(KvmError):
                vm.delete_memory_region(r.slot)
        else:
            vm.delete_memory_region(r.slot)
        if on:
            vm.set_user_memory_region2(r.slot, r.gpa, r.size, uaddr, KVM_MEM_LOG_DIRTY_PAGES)
        else:
            self.bind(vm, r.slot, r.gpa, r.size, r.offset, uaddr)


class MemfdBackend(Backend):
    name = "memfd"
    memfd_flags = os.MFD_CLOEXEC

    def __init__(self, vm: Vm, size_bytes: int) -> None:
        fd = os.memfd_create(f"kvmkit-guest-{self.name}", self.memfd_flags)
        try:
            os.ftruncate(fd, size_bytes)
        except OSError as e:
            os.close(fd)
            raise KvmkitError(f"cannot size the guest memfd: {os.strerror(e.errno or 0)}") from None
        super().__init__(fd, size_bytes)

    def bind(self, vm: Vm, slot: int, gpa: int, size: int, offset: int, uaddr: int) -> None:
        if vm.check_extension(Cap.USER_MEMORY2):
            vm.set_user_memory_region2(slot, gpa, size, uaddr)
        else:
            vm.set_user_memory_region(slot, gpa, size, uaddr)


class HugetlbBackend(MemfdBackend):
    name = "hugetlb"
    map_flags = 0  # reserve the pool at mmap time, so a short pool fails now, not with SIGBUS

    def __init__(self, vm: Vm, size_bytes: int, page_size: int = 2 << 20) -> None:
        check_pool(page_size, size_bytes)
        self.page_size = page_size
        self.memfd_flags = (
            os.MFD_CLOEXEC
            | os.MFD_HUGETLB
            | (os.MFD_HUGE_1GB if page_size == 1 << 30 else os.MFD_HUGE_2MB)
        )
        super().__init__(vm, size_bytes)
        self.notes.append(f"{size_label(page_size)} hugetlb pages")


class ThpBackend(MemfdBackend):
    name = "thp"

    def after_map(self, addr: int, size: int) -> None:
        libc.madvise(addr, size, libc.MADV_HUGEPAGE)
        mode = shmem_thp_mode()
        if mode in ("never", "deny", "unavailable"):
            self.notes.append(
                f"MADV_HUGEPAGE given, but shmem THP is '{mode}' on this host, so it has no"
                " effect: echo advise > /sys/kernel/mm/transparent_hugepage/shmem_enabled"
            )
        else:
            self.notes.append(f"MADV_HUGEPAGE given (shmem THP: {mode})")


@dataclass(frozen=True)
class BackendChoice:
    name: str
    reason: str
    create: Callable[[Vm, int], Backend]


def guest_memfd_shortfall(vm: Vm) -> str:
    """Why guest_memfd cannot back mappable guest RAM here, or "" if it can."""
    if not vm.check_extension(Cap.USER_MEMORY2):
        return "KVM_CAP_USER_MEMORY2 is 0"
    if not vm.check_extension(Cap.GUEST_MEMFD):
        return "KVM_CAP_GUEST_MEMFD is 0"
    flags = vm.guest_memfd_flags()
    if flags & GMEM_FLAGS != GMEM_FLAGS:
        return f"KVM_CAP_GUEST_MEMFD_FLAGS is {flags:#x}, without MMAP|INIT_SHARED (0x3)"
    return ""


def gmem_flag_report(vm: Vm) -> list[str]:
    """What the host's guest_memfd offers beyond the basics, in words."""
    flags = vm.guest_memfd_flags()
    notes = []
    unknown = flags & ~KNOWN_GMEM_FLAGS
    if unknown:
        notes.append(f"this kernel offers guest_memfd flags kvmkit does not know: {unknown:#x}")
    if GUEST_MEMFD_HUGEPAGE_FLAG is None or not flags & GUEST_MEMFD_HUGEPAGE_FLAG:
        notes.append(
            f"no guest_memfd hugepage flag in KVM_CAP_GUEST_MEMFD_FLAGS ({flags:#x}):"
            " guest_memfd uses 4 KiB pages"
        )
    return notes


def choose_backend(
    vm: Vm,
    requested: str = "auto",
    *,
    hugepage_size: int = 2 << 20,
    no_direct_map: bool = False,
) -> BackendChoice:
    """The backend for `requested` (auto, guest_memfd, memfd, hugetlb, thp), and why."""
    if requested not in ("auto", *BACKEND_NAMES):
        raise KvmkitError(
            f"unknown memory backend {requested!r}; choose auto, {', '.join(BACKEND_NAMES)}"
        )
    if no_direct_map:
        supported = vm.guest_memfd_flags()
        if requested not in ("auto", "guest_memfd"):
            raise KvmkitError("removing guest memory from the direct map needs guest_memfd")
        if not supported & GUEST_MEMFD_FLAG_NO_DIRECT_MAP:
            raise KvmUnsupportedError(
                "--hide-guest-memory=direct-map",
                "this kernel lacks GUEST_MEMFD_FLAG_NO_DIRECT_MAP (KVM_CAP_GUEST_MEMFD_FLAGS is"
                f" {supported:#x}: {describe_gmem_flags(supported)}), so guest_memfd pages stay"
                " in the host direct map; use --hide-guest-memory to unmap them from kvmkit",
            )
        return BackendChoice(
            "guest_memfd",
            "requested, without a direct map",
            lambda v, s: GuestMemfdBackend(v, s, GUEST_MEMFD_FLAG_NO_DIRECT_MAP),
        )
    if requested == "memfd":
        return BackendChoice("memfd", "requested", MemfdBackend)
    if requested == "hugetlb":
        return BackendChoice(
            "hugetlb", "requested", lambda v, s: HugetlbBackend(v, s, hugepage_size)
        )
    if requested == "thp":
        return BackendChoice("thp", "requested", ThpBackend)
    shortfall = guest_memfd_shortfall(vm)
    if requested == "guest_memfd":
        if shortfall:
            raise KvmUnsupportedError(
                "guest_memfd backend",
                f"this host's KVM cannot map guest_memfd ({shortfall}); use --memory-backend memfd",
            )
        return BackendChoice("guest_memfd", "requested", GuestMemfdBackend)
    if shortfall:
        return BackendChoice("memfd", f"fallback: guest_memfd unusable ({shortfall})", MemfdBackend)
    return BackendChoice("guest_memfd", "default", GuestMemfdBackend)
