"""`GuestMemory`: guest RAM, its layout, its backend, and host access to it."""

import ctypes
from types import TracebackType

from kvmkit.errors import KvmkitError
from kvmkit.kvm import Vm
from kvmkit.memory.backend import Backend, choose_backend
from kvmkit.memory.layout import RamRegion, ram_regions


class GuestMemoryError(KvmkitError):
    """A guest-physical range that is not (wholly) guest RAM."""


class GuestMemory:
    """All guest RAM of one VM, in one backend file bound to one slot per region.

    `read`, `write` and `view` take guest-physical addresses; a range must lie
    inside one RAM region (not across the MMIO gap) or `GuestMemoryError` says why.
    """

    def __init__(self, vm: Vm, size_bytes: int, backend: str = "auto") -> None:
        self.vm = vm
        self.size_bytes = size_bytes
        self.regions = ram_regions(size_bytes)
        self.choice = choose_backend(vm, backend)
        self.backend: Backend = self.choice.cls(vm, size_bytes)
        self._bound: list[RamRegion] = []
        try:
            self._mem = memoryview(
                (ctypes.c_char * size_bytes).from_address(self.backend.host_addr)
            ).cast("B")
            for region in self.regions:
                self.backend.bind(vm, region.slot, region.gpa, region.size, region.offset)
                self._bound.append(region)
        except BaseException:
            self.close()
            raise

    @property
    def backend_name(self) -> str:
        return self.backend.name

    @property
    def host_mapped_bytes(self) -> int:
        """Bytes of guest RAM the VMM process has mapped right now."""
        return self.backend.size_bytes if self.backend.host_addr else 0

    def region_of(self, gpa: int, length: int = 1) -> RamRegion:
        for region in self.regions:
            if region.contains(gpa, length):
                return region
        ram = ", ".join(f"{r.gpa:#x}-{r.end:#x}" for r in self.regions)
        raise GuestMemoryError(
            f"guest range {gpa:#x}-{gpa + length:#x} ({length} bytes) is not inside guest RAM"
            f" ({ram})"
        )

    def offset_of(self, gpa: int, length: int = 1) -> int:
        """Offset into the backend file of a guest-physical range."""
        if length < 0 or gpa < 0:
            raise GuestMemoryError(f"negative address or length: {gpa:#x}+{length}")
        region = self.region_of(gpa, max(length, 1))
        return region.offset + gpa - region.gpa

    def host_address(self, gpa: int) -> int:
        return self.backend.host_addr + self.offset_of(gpa)

    def view(self, gpa: int, length: int) -> memoryview:
        """A zero-copy, writable view of guest RAM. Do not use it after `close()`."""
        off = self.offset_of(gpa, length)
        return self._mem[off : off + length]

    def read(self, gpa: int, length: int) -> bytes:
        return bytes(self.view(gpa, length))

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        self.view(gpa, len(data))[:] = data

    def close(self) -> None:
        # Unbind first, so a VM that outlives this object never points at unmapped pages.
        if self.vm.fd >= 0:
            for region in self._bound:
                self.vm.delete_memory_region(region.slot)
        self._bound.clear()
        if hasattr(self, "_mem"):
            self._mem.release()
            del self._mem
        self.backend.close()

    def __enter__(self) -> "GuestMemory":
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
