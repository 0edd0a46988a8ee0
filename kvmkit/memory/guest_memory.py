"""`GuestMemory`: guest RAM, its layout, its backend, and every host window onto it."""

import contextlib
import os
import threading

from kvmkit import faults, libc
from kvmkit.closing import Closeable
from kvmkit.errors import KvmkitError
from kvmkit.kvm import KvmError, KvmUnsupportedError, Vm
from kvmkit.memory.attributes import AttributeMap
from kvmkit.memory.backend import Backend, choose_backend, gmem_flag_report
from kvmkit.memory.exposure import HostMappings, HostWindow
from kvmkit.memory.layout import PAGE_SIZE, RamRegion, format_size, ram_regions
from kvmkit.memory.numa import GMEM_HONOURS_MBIND, NumaPolicy, kernel_version
from kvmkit.memory.population import Extent, populated_extents
from kvmkit.uapi.caps import Cap
from kvmkit.uapi.memory import KVM_MEMORY_ATTRIBUTE_PRIVATE


class GuestMemoryError(KvmkitError):
    """A guest-physical range that is not (wholly) guest RAM, or not mapped in the host."""


class GuestMemory(Closeable):
    """All guest RAM of one VM, in one backend file bound to one slot per region.

    The VMM sees guest RAM only through host windows (`windows`): at first one window
    over the whole file; after `hide()`, only the small windows devices declare.
    `read`, `write` and `view` take guest-physical addresses and work inside a window.
    """

    def __init__(
        self,
        vm: Vm,
        size_bytes: int,
        backend: str = "auto",
        *,
        hugepage_size: int = 2 << 20,
        numa: NumaPolicy | None = None,
        prealloc: bool = False,
        no_direct_map: bool = False,
    ) -> None:
        self.vm = vm
        self.size_bytes = size_bytes
        self.regions = ram_regions(size_bytes)
        self.choice = choose_backend(
            vm, backend, hugepage_size=hugepage_size, no_direct_map=no_direct_map
        )
        try:
            faults.inject("memory.create")
            self.backend: Backend = self.choice.create(vm, size_bytes)
        except OSError as e:
            raise KvmkitError(
                f"cannot create {format_size(size_bytes)} of {self.choice.name} guest memory:"
                f" {e.strerror}"
            ) from None
        self._notes: list[str] = gmem_flag_report(vm) if self.backend.name == "guest_memfd" else []
        self.mappings = HostMappings(self.backend.fd, self.backend.map_flags)
        self.attributes = AttributeMap()
        self.numa = numa
        self.hidden = False
        self._host_dirty: bytearray | None = None  # a byte per page the VMM wrote
        self._host_dirty_lock = threading.Lock()
        self._bound: list[RamRegion] = []
        try:
            try:
                main = self.mappings.map(0, size_bytes, "vmm")
            except OSError as e:
                raise KvmkitError(
                    f"cannot map {size_bytes >> 20} MiB of {self.backend.name} guest memory into"
                    f" the host: {e.strerror}"
                ) from None
            self.backend.after_map(main.addr, main.size)
            if numa is not None:
                numa.apply(main.addr, main.size)  # before the first touch
                self._notes.append(self._numa_note())
            if prealloc:
                self.prealloc()
            self._bind_all(main.addr)
        except BaseException:
            self.close()
            raise

    # -- slots ----------------------------------------------------------------
    def _bind_all(self, host_base: int) -> None:
        for region in self.regions:
            uaddr = host_base + region.offset if host_base else 0
            self.backend.bind(self.vm, region.slot, region.gpa, region.size, region.offset, uaddr)
            self._bound.append(region)

    def log_dirty(self, on: bool) -> str:
        """Turn KVM dirty-page logging on or off for every RAM slot; returns how (see
        the backend's `set_logging`: a flag change, or for guest_memfd a swap to plain
        slots over the same pages, during which the vCPUs must be out of KVM_RUN). If
        KVM refuses a slot, every slot is put back as it was and the error is raised."""
        if self.hidden:
            raise GuestMemoryError("dirty logging needs guest RAM mapped in the host")
        done: list[RamRegion] = []
        try:
            for region in self._bound:
                done.append(region)
                self._set_logging(region, on)
        except KvmkitError:
            for region in done:
                with contextlib.suppress(KvmkitError):
                    self._set_logging(region, not on, repair=True)
            raise
        return self.backend.logging_method

    def _set_logging(self, region: RamRegion, on: bool, repair: bool = False) -> None:
        uaddr = self.host_address(region.gpa)
        self.backend.set_logging(self.vm, region, uaddr, on, repair)

    def _unbind_all(self) -> None:
        if self.vm.fd >= 0:
            for region in self._bound:
                self.vm.delete_memory_region(region.slot)
        self._bound.clear()

    # -- addressing -----------------------------------------------------------
    @property
    def notes(self) -> list[str]:
        """Facts about this memory worth telling a user: flags, hugepages, NUMA."""
        return [*self.backend.notes, *self._notes]

    @property
    def backend_name(self) -> str:
        return self.backend.name

    @property
    def windows(self) -> list[HostWindow]:
        return list(self.mappings.windows)

    @property
    def host_mapped_bytes(self) -> int:
        """Bytes of guest RAM the VMM process has mapped right now."""
        return self.mappings.mapped_bytes

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

    def _window(self, gpa: int, length: int) -> tuple[HostWindow, int]:
        off = self.offset_of(gpa, length)
        window = self.mappings.covering(off, max(length, 1))
        if window is None:
            shown = ", ".join(f"{w.owner} {w.offset:#x}+{w.size:#x}" for w in self.windows)
            raise GuestMemoryError(
                f"guest range {gpa:#x}+{length:#x} is hidden from the host"
                f" (mapped windows: {shown or 'none'}); declare a shared window for it"
            )
        return window, off - window.offset

    def file_view(self, offset: int, length: int) -> memoryview:
        """A zero-copy view of the backend file's bytes [offset, offset+length), through
        whichever host window covers them (for whole-memory copies: snapshots)."""
        window = self.mappings.covering(offset, max(length, 1))
        if window is None:
            raise GuestMemoryError(
                f"guest RAM file range {offset:#x}+{length:#x} is not mapped in the host"
            )
        rel = offset - window.offset
        return window.view[rel : rel + length]

    def populate_file_range(self, offset: int, length: int) -> None:
        """Allocate the backend file's pages [offset, offset+length) and map them into
        kvmkit's window now (fallocate, then MADV_POPULATE_WRITE): much cheaper than the
        page faults of writing them one by one. Best effort: where either call is
        refused, the pages are allocated by the writes that follow instead."""
        window = self.mappings.covering(offset, max(length, 1))
        if window is None:
            return
        with contextlib.suppress(OSError):
            libc.fallocate(self.backend.fd, libc.FALLOC_FL_KEEP_SIZE, offset, length)
        with contextlib.suppress(OSError):
            libc.madvise(window.addr + offset - window.offset, length, libc.MADV_POPULATE_WRITE)

    def zero_file_range(self, offset: int, length: int) -> None:
        """Make the backend file's bytes [offset, offset+length) read as zeros: punched
        out where the range is whole backend pages (freeing them), else written."""
        step = self.backend.page_size
        if offset % step == 0 and length % step == 0:
            try:
                self._punch(offset, length)
                return
            except OSError:
                pass  # a backend that cannot punch: write the zeros instead
        view = self.file_view(offset, length)
        zeros = bytes(min(length, 1 << 20))
        for at in range(0, length, len(zeros)):
            view[at : at + len(zeros)] = zeros[: length - at]

    def host_address(self, gpa: int) -> int:
        window, rel = self._window(gpa, 1)
        return window.addr + rel

    def view(self, gpa: int, length: int) -> memoryview:
        """A zero-copy, writable view of guest RAM. Do not keep it past `hide()`/`close()`."""
        window, rel = self._window(gpa, length)
        return window.view[rel : rel + length]

    def read(self, gpa: int, length: int) -> bytes:
        return bytes(self.view(gpa, length))

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        self.view(gpa, len(data))[:] = data

    # -- writes by the VMM ------------------------------------------------------
    def track_host_writes(self, on: bool) -> None:
        """Record the pages devices write (`mark_dirty`) from now on, or stop. KVM's
        dirty log sees only the guest's own writes; a migration needs these too."""
        with self._host_dirty_lock:
            self._host_dirty = bytearray(self.size_bytes // PAGE_SIZE) if on else None

    def mark_dirty(self, gpa: int, length: int) -> None:
        """A device wrote guest RAM [gpa, gpa+length) (a used ring, data it read)."""
        if self._host_dirty is None or length <= 0:
            return
        offset = self.offset_of(gpa, length)
        first, end = offset // PAGE_SIZE, (offset + length + PAGE_SIZE - 1) // PAGE_SIZE
        with self._host_dirty_lock:
            if self._host_dirty is not None:
                self._host_dirty[first:end] = b"\1" * (end - first)

    def host_dirty_runs(self) -> list[tuple[int, int]]:
        """(file offset, length) runs devices wrote since the last call; clears them."""
        with self._host_dirty_lock:
            pages = self._host_dirty
            if pages is None:
                return []
            self._host_dirty = bytearray(len(pages))
        runs = []
        i = pages.find(1)
        while i >= 0:
            j = pages.find(0, i)
            j = len(pages) if j < 0 else j
            runs.append((i * PAGE_SIZE, (j - i) * PAGE_SIZE))
            i = pages.find(1, j)
        return runs

    # -- exposure ---------------------------------------------------------------
    def hide(self, keep: list[tuple[int, int, str]] | None = None) -> None:
        """Unmap all guest RAM from this process, then map back only `keep`:
        (gpa, size, owner) windows that devices need. Slots are rebound with no host
        address, so KVM serves the guest from guest_memfd alone."""
        if not self.backend.can_hide:
            raise KvmUnsupportedError(
                "--hide-guest-memory",
                f"the {self.backend.name} backend is reached through the host mapping;"
                " hiding guest memory needs guest_memfd",
            )
        self._unbind_all()
        self.mappings.unmap_all()
        self.hidden = True
        self._bind_all(0)
        for gpa, size, owner in keep or []:
            self.share_window(gpa, size, owner)

    def share_window(self, gpa: int, size: int, owner: str) -> HostWindow:
        """Map [gpa, gpa+size), widened to whole pages, for a device that needs it."""
        start = gpa & ~(PAGE_SIZE - 1)
        end = (gpa + size + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
        return self.mappings.map(self.offset_of(start, end - start), end - start, owner)

    def exposure_report(self) -> str:
        if not self.windows:
            return "no guest RAM mapped in the VMM"
        parts = ", ".join(f"{w.owner} {format_size(w.size)}" for w in self.windows)
        return f"{format_size(self.host_mapped_bytes)} of guest RAM mapped in the VMM ({parts})"

    # -- population -------------------------------------------------------------
    def _check_discard(self, gpa: int, size: int) -> int:
        unit = self.backend.page_size
        if size <= 0 or gpa % unit or size % unit:
            raise GuestMemoryError(
                f"discard {gpa:#x}+{size:#x}: address and size must be multiples of"
                f" {unit >> 10} KiB, the {self.backend.name} page size"
            )
        return self.offset_of(gpa, size)

    def discard(self, gpa: int, size: int) -> None:
        """Free [gpa, gpa+size): the host gets the memory back; the guest reads zeros."""
        off = self._check_discard(gpa, size)
        try:
            faults.inject("memory.punch")
            self._punch(off, size)
        except OSError as e:
            raise KvmkitError(
                f"discard {gpa:#x}+{size:#x} failed: {e.strerror}; the guest's memory there"
                " is unchanged"
            ) from None

    def _punch(self, offset: int, length: int) -> None:
        """Free the backend file's [offset, offset+length); it reads as zeros after."""
        libc.fallocate(
            self.backend.fd, libc.FALLOC_FL_PUNCH_HOLE | libc.FALLOC_FL_KEEP_SIZE, offset, length
        )

    def prealloc(self) -> None:
        """Allocate every page of guest RAM now (fallocate), under the NUMA policy."""
        numa = self.numa
        use_thread_policy = numa is not None
        if numa is not None:
            libc.set_mempolicy(numa.mpol, numa.nodes)
        try:
            faults.inject("memory.fallocate")
            libc.fallocate(self.backend.fd, libc.FALLOC_FL_KEEP_SIZE, 0, self.size_bytes)
        except OSError as e:
            raise KvmkitError(
                f"preallocating {self.size_bytes >> 20} MiB of {self.backend.name} memory failed:"
                f" {e.strerror}"
            ) from None
        finally:
            if use_thread_policy:
                libc.set_mempolicy(libc.MPOL_DEFAULT, ())

    def populated_extents(self) -> tuple[list[Extent], str]:
        """The populated byte ranges of the guest RAM file, and how they were found
        (see kvmkit/memory/population.py: the cost follows populated memory, not size)."""
        return populated_extents(
            self.mappings,
            self.size_bytes,
            self.backend.page_size,
            seekable=self.backend.name != "guest_memfd",
        )

    def populated_bytes(self) -> int:
        """Bytes of guest RAM that exist in host memory right now.

        memfd-based backends: the file's allocated blocks (exact). guest_memfd reports
        no blocks, so this counts its initialised pages (`populated_extents`): pages
        allocated by fallocate but never touched by the guest or the host are not
        visible (measured on 6.18).
        """
        if self.backend.name != "guest_memfd":
            return min(os.fstat(self.backend.fd).st_blocks * 512, self.size_bytes)
        return sum(e.length for e in self.populated_extents()[0])

    def _numa_note(self) -> str:
        assert self.numa is not None
        note = f"NUMA policy {self.numa.describe()} (mbind before first touch)"
        if self.backend.name == "guest_memfd" and kernel_version() < GMEM_HONOURS_MBIND:
            note += (
                "; this kernel's guest_memfd allocates by the faulting thread's policy, not the"
                " mapping's (that arrives in 6.19): --prealloc applies it through set_mempolicy"
            )
        return note

    # -- attributes -------------------------------------------------------------
    def set_private(self, gpa: int, size: int, private: bool = True) -> None:
        """Convert a range to private (or back to shared) with KVM_SET_MEMORY_ATTRIBUTES."""
        supported = self.vm.check_extension(Cap.MEMORY_ATTRIBUTES)
        if not supported & KVM_MEMORY_ATTRIBUTE_PRIVATE:
            raise KvmUnsupportedError(
                "KVM_SET_MEMORY_ATTRIBUTES",
                f"this host's KVM offers no private memory attribute (KVM_CAP_MEMORY_ATTRIBUTES"
                f" is {supported:#x}); private/shared conversion needs a VM type with private"
                " memory (KVM_CAP_VM_TYPES) on a kernel that supports it",
            )
        self.offset_of(gpa, size)
        self.vm.set_memory_attributes(gpa, size, KVM_MEMORY_ATTRIBUTE_PRIVATE if private else 0)
        if private:
            self.attributes.set_private(gpa, size)
        else:
            self.attributes.set_shared(gpa, size)

    # -- teardown ---------------------------------------------------------------
    def close(self) -> None:
        # Unbind first, so a VM that outlives this object never points at unmapped pages.
        # If KVM refuses, unmapping is still safe: the VM's fd is closed next (by Machine)
        # and, on a VM that lives on, a stale slot faults instead of reading freed pages.
        try:
            self._unbind_all()
        except KvmError:
            self._bound.clear()
        finally:
            if hasattr(self, "mappings"):
                self.mappings.unmap_all()
            self.backend.close()
