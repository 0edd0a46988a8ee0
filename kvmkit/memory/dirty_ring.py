"""KVM's per-vCPU dirty rings (KVM_CAP_DIRTY_LOG_RING[_ACQ_REL]), harvested into the
same file byte runs as the dirty bitmap.

Each vCPU has a ring of `kvm_dirty_gfn {u32 flags, u32 slot, u64 offset}` entries that
KVM fills as the guest writes to a slot with KVM_MEM_LOG_DIRTY_PAGES. kvmkit reads the
entries whose DIRTY flag is set, from where it stopped last time, marks each RESET,
and then KVM_RESET_DIRTY_RINGS write-protects those pages again (a later write is
logged anew). A page is read after that reset, so a write between the harvest and
the reset is in the data sent. When a ring fills, its vCPU exits with
KVM_EXIT_DIRTY_RING_FULL; the vCPU thread harvests then (`harvest_full`) and the pages
wait in `pending` for the next `collect`.
"""

import threading

from kvmkit.kvm import Vm
from kvmkit.memory.layout import PAGE_SIZE
from kvmkit.uapi.memory import KVM_DIRTY_GFN_F_DIRTY, KVM_DIRTY_GFN_F_RESET

Run = tuple[int, int]  # (offset into the guest RAM file, length in bytes)
ENTRY_BYTES = 16
DEFAULT_RING_BYTES = 64 << 10  # 4096 entries per vCPU


def page_runs(pages: set[int]) -> list[Run]:
    """File page numbers as sorted byte runs, neighbours joined."""
    runs: list[Run] = []
    start = end = -1
    for page in sorted(pages):
        if page == end:
            end += 1
            continue
        if start >= 0:
            runs.append((start * PAGE_SIZE, (end - start) * PAGE_SIZE))
        start, end = page, page + 1
    if start >= 0:
        runs.append((start * PAGE_SIZE, (end - start) * PAGE_SIZE))
    return runs


class DirtyRings:
    """The dirty rings of every vCPU of `vm`. `slot_offsets` maps a memory slot to the
    file offset of its first page."""

    def __init__(self, vm: Vm, slot_offsets: dict[int, int]) -> None:
        self.vm = vm
        self.slot_pages = {slot: offset // PAGE_SIZE for slot, offset in slot_offsets.items()}
        self.entries = vm.dirty_ring_bytes // ENTRY_BYTES
        self._next = [0] * len(vm.vcpus)
        self._suspect = [False] * len(vm.vcpus)  # may be behind KVM after an overflow
        self._pending: set[int] = set()
        self._lock = threading.Lock()
        self.full_exits = 0
        self.harvested = 0
        self.resyncs = 0
        self.lost = False  # a ring overflowed: some dirty pages were not reported

    def _harvest_locked(self, full_vcpu: int | None = None) -> set[int]:
        pages: set[int] = set()
        for i, vcpu in enumerate(self.vm.vcpus):
            if vcpu.dirty_ring is not None:
                self._harvest_ring(i, vcpu.dirty_ring, pages, resync=i == full_vcpu)
        # KVM may reset fewer entries per call than were marked (later kernels bound the
        # work per call), so ask until it has none left: a ring left full would make its
        # vCPU exit with DIRTY_RING_FULL again at once.
        while self.vm.reset_dirty_rings() > 0:
            pass
        return pages

    def _harvest_ring(self, i: int, ring: memoryview, pages: set[int], resync: bool) -> None:
        mask = self.entries - 1
        at = self._next[i]
        if resync and not ring[2 * (at & mask)] & KVM_DIRTY_GFN_F_DIRTY:
            self._suspect[i] = True  # full, yet nothing due: our index is behind KVM's
        if self._suspect[i]:
            at = self._resync(i, ring, at)
        taken = 0
        slot_pages = self.slot_pages
        while taken < self.entries:
            word = 2 * (at & mask)
            head = ring[word]
            if not head & KVM_DIRTY_GFN_F_DIRTY:
                break
            first = slot_pages.get((head >> 32) & 0xFFFF)  # address space 0
            if first is not None:
                pages.add(first + ring[word + 1])
            ring[word] = (head & ~0xFFFFFFFF) | KVM_DIRTY_GFN_F_RESET
            at += 1
            taken += 1
        if taken == self.entries:
            # Every entry was dirty: KVM may have pushed past the end of the ring and
            # overwritten entries (measured on PVM: its instruction emulator writes a
            # batch of pages without honouring the soft-full exit). Those pages are
            # lost, and KVM's next entry may lie past a gap of invalid ones.
            self.lost = True
            self._suspect[i] = True
        self._next[i] = at
        self.harvested += taken

    def _resync(self, i: int, ring: memoryview, at: int) -> int:
        """After an overflow, KVM's next entry lies past a gap of invalid ones (the
        entries its reset cleared). The first dirty entry from `at` on is KVM's: skip to
        it, marking the gap harvested so KVM's reset can pass it. With no dirty entry
        yet, stay suspect and look again next time."""
        mask = self.entries - 1
        for k in range(self.entries):
            if ring[2 * ((at + k) & mask)] & KVM_DIRTY_GFN_F_DIRTY:
                for j in range(k):
                    word = 2 * ((at + j) & mask)
                    ring[word] = (ring[word] & ~0xFFFFFFFF) | KVM_DIRTY_GFN_F_RESET
                if k:
                    self.lost = True
                    self.resyncs += 1
                self._suspect[i] = False
                return at + k
        return at

    def harvest_full(self, vcpu_index: int) -> None:
        """`vcpu_index`'s ring is full (called on its thread): harvest every ring now."""
        with self._lock:
            self.full_exits += 1
            self._pending |= self._harvest_locked(full_vcpu=vcpu_index)

    def collect(self) -> list[Run]:
        """The pages written since the last collect, as file byte runs."""
        with self._lock:
            pages = self._pending | self._harvest_locked()
            self._pending = set()
        return page_runs(pages)

    def discard(self) -> None:
        """Drop whatever the rings and `pending` hold, and forget a loss (logging is
        being turned on afresh, or off)."""
        self.collect()
        self.lost = False
