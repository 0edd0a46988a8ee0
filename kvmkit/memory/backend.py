"""Where guest RAM lives: one host file, mapped once, bound to KVM memory slots.

`GuestMemfdBackend` (the default) keeps RAM in a guest_memfd created with
MMAP|INIT_SHARED; `MemfdBackend` uses a plain memfd. `choose_backend` picks one
from what the host offers and says why.
"""

import os
from dataclasses import dataclass
from typing import ClassVar

from kvmkit import libc
from kvmkit.errors import KvmkitError
from kvmkit.kvm import KvmUnsupportedError, Vm
from kvmkit.uapi.caps import Cap
from kvmkit.uapi.memory import (
    GUEST_MEMFD_FLAG_INIT_SHARED,
    GUEST_MEMFD_FLAG_MMAP,
    KVM_MEM_GUEST_MEMFD,
)

BACKEND_NAMES = ("guest_memfd", "memfd")
GMEM_FLAGS = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED


class Backend:
    """A file holding guest RAM, mapped whole into the host at `host_addr`."""

    name: ClassVar[str]

    def __init__(self, fd: int, size_bytes: int) -> None:
        self.fd = fd
        self.size_bytes = size_bytes
        self.host_addr = 0
        try:
            self.host_addr = libc.mmap(
                size_bytes,
                libc.PROT_READ | libc.PROT_WRITE,
                libc.MAP_SHARED | libc.MAP_NORESERVE,
                fd,
            )
        except OSError as e:
            os.close(fd)
            raise KvmkitError(
                f"cannot map {size_bytes >> 20} MiB of {self.name} guest memory into the host: "
                f"{os.strerror(e.errno or 0)}"
            ) from None

    def bind(self, vm: Vm, slot: int, gpa: int, size: int, offset: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        if self.host_addr:
            libc.munmap(self.host_addr, self.size_bytes)
            self.host_addr = 0
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class GuestMemfdBackend(Backend):
    """guest_memfd with GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED."""

    name = "guest_memfd"

    def __init__(self, vm: Vm, size_bytes: int) -> None:
        super().__init__(vm.create_guest_memfd(size_bytes, GMEM_FLAGS), size_bytes)

    def bind(self, vm: Vm, slot: int, gpa: int, size: int, offset: int) -> None:
        # userspace_addr is set to the same pages: upstream ignores it for an
        # mmap-able guest_memfd slot, and PVM hosts access guest memory through it.
        vm.set_user_memory_region2(
            slot,
            gpa,
            size,
            self.host_addr + offset,
            flags=KVM_MEM_GUEST_MEMFD,
            guest_memfd=self.fd,
            guest_memfd_offset=offset,
        )


class MemfdBackend(Backend):
    """A plain memfd (shmem), for hosts without a mappable guest_memfd."""

    name = "memfd"

    def __init__(self, vm: Vm, size_bytes: int) -> None:
        fd = os.memfd_create("kvmkit-guest-ram", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size_bytes)
        except OSError as e:
            os.close(fd)
            raise KvmkitError(f"cannot size the guest memfd: {os.strerror(e.errno or 0)}") from None
        super().__init__(fd, size_bytes)

    def bind(self, vm: Vm, slot: int, gpa: int, size: int, offset: int) -> None:
        if vm.check_extension(Cap.USER_MEMORY2):
            vm.set_user_memory_region2(slot, gpa, size, self.host_addr + offset)
        else:
            vm.set_user_memory_region(slot, gpa, size, self.host_addr + offset)


@dataclass(frozen=True)
class BackendChoice:
    cls: type[Backend]
    reason: str

    @property
    def name(self) -> str:
        return self.cls.name


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


def choose_backend(vm: Vm, requested: str = "auto") -> BackendChoice:
    """The backend to use for `requested` ("auto", "guest_memfd" or "memfd")."""
    if requested == "memfd":
        return BackendChoice(MemfdBackend, "requested")
    shortfall = guest_memfd_shortfall(vm)
    if requested == "guest_memfd":
        if shortfall:
            raise KvmUnsupportedError(
                "guest_memfd backend",
                f"this host's KVM cannot map guest_memfd ({shortfall}); use --memory-backend memfd",
            )
        return BackendChoice(GuestMemfdBackend, "requested")
    if requested != "auto":
        raise KvmkitError(
            f"unknown memory backend {requested!r}; choose one of auto, {', '.join(BACKEND_NAMES)}"
        )
    if shortfall:
        return BackendChoice(MemfdBackend, f"fallback: guest_memfd unusable ({shortfall})")
    return BackendChoice(GuestMemfdBackend, "default")
