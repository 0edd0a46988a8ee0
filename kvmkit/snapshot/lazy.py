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
from kvmkit.snapshot.format import END, MEMORY, SectionHead, StreamFormatError
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
        self._zero = (ctypes.c_char * PAGE_SIZE)()
        self._zero_addr = ctypes.addressof(self._zero)
        self._windows = self._map_chunks()
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
        """Walk the chunk heads (seeking past payloads) and check the end marker, so a
        truncated file is refused before the guest starts."""
        reader = self.snap.reader
        windows: dict[int, list[tuple[Extent, SectionHead]]] = {}
        for i, extent in enumerate(self.snap.saved.memory_index):
            head = reader.next_section()
            if head.tag != MEMORY or head.raw_bytes != extent.length:
                raise StreamFormatError(f"{reader.what}: {head.label}: not memory chunk {i}")
            reader.skip_payload(head, self.snap.file.seek)
            windows.setdefault(extent.offset // CHUNK_BYTES, []).append((extent, head))
        head = reader.next_section()
        if head.tag != END:
            raise StreamFormatError(f"{reader.what}: {head.label}: expected the end marker")
        reader.read_payload(head)
        return windows

    # -- loading ------------------------------------------------------------------------
    def _load_window(self, window: int) -> bool:
        """Copy every chunk of `window` into place (caller holds the lock); False if it
        was already loaded."""
        chunks = self._windows.pop(window, None)
        if chunks is None:
            return False
        fd = self.snap.file.fileno()
        for extent, head in chunks:
            data = self.snap.reader.pread_payload(fd, head)
            src = (ctypes.c_char * len(data)).from_buffer_copy(data)
            dst = self.base + extent.offset
            if not self.uffd.copy(dst, ctypes.addressof(src), extent.length):
                for at in range(0, extent.length, PAGE_SIZE):  # some page raced in
                    self.uffd.copy(dst + at, ctypes.addressof(src) + at, PAGE_SIZE)
            self.stats.bytes_loaded += extent.length
        return True

    def _serve_faults(self) -> None:
        try:
            while not self._closed.is_set() and not self.done.is_set():
                for addr in self.uffd.wait_faults(0.05):
                    with self._lock:
                        if self.done.is_set():  # unregistered: the kernel woke the fault
                            break
                        self._serve(addr)
        except (OSError, KvmkitError) as e:
            self._fail(e)

    def _serve(self, addr: int) -> None:
        self.stats.faults += 1
        if self._load_window((addr - self.base) // CHUNK_BYTES):
            self.stats.windows_on_demand += 1
            if not self._windows:
                self._complete()
                return
        page = addr & ~(PAGE_SIZE - 1)
        # A page no chunk holds was never populated: it reads as zeros. (A copy of a zero
        # page: UFFDIO_ZEROPAGE gives ENOENT on shmem.) Present already: just wake.
        if self.uffd.copy(page, self._zero_addr, PAGE_SIZE):
            self.stats.zero_pages += 1
        else:
            self.uffd.wake(page, PAGE_SIZE)

    def _prefetch(self) -> None:
        try:
            for window in self._pending:
                if self._closed.is_set():
                    return
                with self._lock:
                    if self._load_window(window):
                        self.stats.windows_prefetched += 1
            with self._lock:
                self._complete()
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
        """Until every chunk is loaded (a snapshot of this machine needs all of them)."""
        if not self.done.wait(timeout_s):
            raise KvmkitError(self.error or "lazy restore did not finish in time")

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
