"""Lazy restore: the guest starts at once; memory arrives on first touch.

Guest RAM is registered with userfaultfd (missing mode). A handler thread serves each
fault: it loads the whole snapshot chunk window (CHUNK_BYTES) holding the page, with
its checksum verified, through UFFDIO_COPY; a page no chunk holds was never populated
and gets a zero page. A prefetch thread loads the remaining windows in order; once
all are in, the range is unregistered and memory behaves as if restored eagerly.

Measured on 6.18: userfaultfd registration works on memfd, hugetlb and THP mappings,
and KVM's own accesses to guest memory (guest page faults, through GUP) wait for it.
guest_memfd mappings refuse registration (EINVAL), so lazy restore needs a memfd
backend there: `--memory-backend memfd --lazy`.
"""

import ctypes
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from kvmkit.errors import KvmkitError
from kvmkit.kvm import KvmUnsupportedError
from kvmkit.memory import GuestMemory
from kvmkit.memory.layout import PAGE_SIZE
from kvmkit.memory.userfault import Userfaultfd
from kvmkit.snapshot.file import SnapshotFile
from kvmkit.snapshot.format import (
    END,
    END_BYTES,
    MEMORY,
    SECTION_OVERHEAD,
    SectionHead,
    StreamFormatError,
)
from kvmkit.snapshot.memory_image import CHUNK_BYTES, Extent

ErrorFn = Callable[[str], None]


@dataclass
class LazyStats:
    faults: int = 0
    windows_on_demand: int = 0
    windows_prefetched: int = 0
    zero_pages: int = 0
    bytes_loaded: int = 0
    seconds_to_complete: float = 0.0


class LazyRestore:
    """Owns the snapshot file and the userfaultfd until every chunk is loaded."""

    def __init__(self, snap: SnapshotFile, memory: GuestMemory, prefetch: bool = True) -> None:
        """`prefetch=False` loads only what is touched (for tests and measurements)."""
        self.snap = snap
        self.memory = memory
        self.stats = LazyStats()
        self.on_error: ErrorFn | None = None
        self.error: str | None = None
        self.done = threading.Event()
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._windows = self._map_chunks()  # not yet claimed by a loader
        self._extents = {w: [e for e, _ in chunks] for w, chunks in self._windows.items()}
        self._in_flight: set[int] = set()
        self._pending = sorted(self._windows)
        window = memory.mappings.covering(0, memory.size_bytes)
        if window is None:
            raise KvmkitError("lazy restore needs guest memory mapped in kvmkit")
        self.base, self.size = window.addr, window.size
        self.uffd = Userfaultfd()
        try:
            self.uffd.register(self.base, self.size)
        except OSError as e:
            self.uffd.close()
            raise KvmUnsupportedError(
                "--lazy",
                f"userfaultfd cannot register {memory.backend_name} memory here"
                f" ({e.strerror}); restore with --memory-backend memfd --lazy, or without --lazy",
            ) from None
        self._start = time.monotonic()
        if not self._windows:
            with self._lock:
                self._complete()
        self._threads = [
            threading.Thread(target=self._serve_faults, name="kvmkit-uffd", daemon=True)
        ]
        if prefetch:
            self._threads.append(
                threading.Thread(target=self._prefetch, name="kvmkit-prefetch", daemon=True)
            )
        for t in self._threads:
            t.start()

    def _map_chunks(self) -> dict[int, list[tuple[Extent, SectionHead]]]:
        """Where each chunk's section is, without reading the chunks: for an uncompressed
        snapshot the memory index gives every position, and one read of the end marker
        (which records its own position and the section count) confirms the layout, so
        this costs the same for 1 GiB and 8 GiB. A compressed snapshot is walked head by
        head instead. Either way a truncated file is refused before the guest starts;
        each chunk's head and checksum are verified when it is loaded."""
        reader, fd = self.snap.reader, self.snap.file.fileno()
        index = self.snap.saved.memory_index
        heads, pos = [], reader.offset
        for i, extent in enumerate(index):
            heads.append(
                SectionHead(reader.sections + i, MEMORY, 0, extent.length, extent.length, pos)
            )
            pos += SECTION_OVERHEAD + extent.length
        end = SectionHead(reader.sections + len(index), END, 0, END_BYTES, END_BYTES, pos)
        try:
            reader.pread_section(fd, end)
        except StreamFormatError:
            heads = self._walk_heads(index)  # compressed chunks: sizes vary
        windows: dict[int, list[tuple[Extent, SectionHead]]] = {}
        for extent, head in zip(index, heads, strict=True):
            windows.setdefault(extent.offset // CHUNK_BYTES, []).append((extent, head))
        return windows

    def _walk_heads(self, index: list[Extent]) -> list[SectionHead]:
        reader = self.snap.reader
        heads = []
        for i, extent in enumerate(index):
            head = reader.next_section()
            if head.tag != MEMORY or head.raw_bytes != extent.length:
                raise StreamFormatError(f"{reader.what}: {head.label}: not memory chunk {i}")
            reader.skip_payload(head, self.snap.file.seek)
            heads.append(head)
        head = reader.next_section()
        if head.tag != END:
            raise StreamFormatError(f"{reader.what}: {head.label}: expected the end marker")
        reader.read_payload(head)
        return heads

    # -- loading ------------------------------------------------------------------------
    # Disk reads and copies run outside the lock, so a guest fault never waits behind a
    # prefetch read of another window; the lock only hands out windows.
    def _claim(self, window: int) -> list[tuple[Extent, SectionHead]] | None:
        with self._lock:
            chunks = self._windows.pop(window, None)
            if chunks is not None:
                self._in_flight.add(window)
            return chunks

    def _load(self, window: int, chunks: list[tuple[Extent, SectionHead]]) -> None:
        fd = self.snap.file.fileno()
        for extent, head in chunks:
            data = self.snap.reader.pread_section(fd, head)
            src = (ctypes.c_char * len(data)).from_buffer_copy(data)
            dst = self.base + extent.offset
            if not self.uffd.copy(dst, ctypes.addressof(src), extent.length):
                for at in range(0, extent.length, PAGE_SIZE):  # a page was present already
                    self.uffd.copy(dst + at, ctypes.addressof(src) + at, PAGE_SIZE)
        with self._lock:
            self._in_flight.discard(window)
            self.stats.bytes_loaded += sum(e.length for e, _ in chunks)
            if not self._windows and not self._in_flight:
                self._complete()

    def _serve_faults(self) -> None:
        try:
            while not self._closed.is_set() and not self.done.is_set():
                for addr in self.uffd.wait_faults(0.05):
                    if self.done.is_set():  # unregistered: the kernel woke the fault
                        break
                    self._serve(addr)
        except (OSError, KvmkitError) as e:
            self._fail(e)

    def _serve(self, addr: int) -> None:
        self.stats.faults += 1
        offset = (addr - self.base) & ~(PAGE_SIZE - 1)
        window = offset // CHUNK_BYTES
        chunks = self._claim(window)
        if chunks is not None:
            self.stats.windows_on_demand += 1
            self._load(window, chunks)  # UFFDIO_COPY wakes the faulting thread
            return
        if any(e.offset <= offset < e.end for e in self._extents.get(window, ())):
            # Saved data that the prefetch is copying (its copy wakes the fault) or has
            # copied (a stale fault): waking is all that is left to do.
            if window not in self._in_flight:
                self.uffd.wake(self.base + offset, PAGE_SIZE)
            return
        # A page no chunk holds was never populated: it reads as zeros.
        if self.uffd.zeropage(self.base + offset, PAGE_SIZE):
            self.stats.zero_pages += 1
        else:
            self.uffd.wake(self.base + offset, PAGE_SIZE)

    def _prefetch(self) -> None:
        try:
            for window in self._pending:
                if self._closed.is_set():
                    return
                chunks = self._claim(window)
                if chunks is not None:
                    self._load(window, chunks)
                    self.stats.windows_prefetched += 1
        except (OSError, KvmkitError) as e:
            self._fail(e)

    def _complete(self) -> None:
        """Everything saved is in (caller holds the lock): unregister, which wakes any
        waiting fault, so untouched pages fault in normally from now on."""
        if not self.done.is_set():
            self.uffd.unregister(self.base, self.size)
            self.stats.seconds_to_complete = time.monotonic() - self._start
            self.done.set()

    def _fail(self, error: Exception) -> None:
        if self._closed.is_set():
            return
        self.error = f"lazy restore failed, the guest cannot continue: {error}"
        if self.on_error is not None:
            self.on_error(self.error)

    def wait(self, timeout_s: float | None = None) -> None:
        """Until every chunk is loaded."""
        if not self.done.wait(timeout_s):
            raise KvmkitError(self.error or "lazy restore did not finish in time")

    def finish(self, timeout_s: float | None = 60.0) -> None:
        """Load every chunk not yet in, on this thread (alongside the prefetch, if any),
        then wait for loads in flight: a snapshot or a migration of this machine needs
        all of its memory, and without prefetch the guest may never touch it all."""
        self._prefetch()
        if self.error is not None:
            raise KvmkitError(self.error)
        self.wait(timeout_s)

    def close(self) -> None:
        self._closed.set()
        for t in self._threads:
            t.join(5)
        self.uffd.close()  # wakes any fault still waiting (it then sees plain memory)
        self.snap.close()


def start_lazy_restore(
    snap: SnapshotFile, memory: GuestMemory, prefetch: bool = True
) -> LazyRestore:
    return LazyRestore(snap, memory, prefetch)
