"""Which guest pages changed: KVM's dirty bitmap per RAM slot, or the per-vCPU dirty
rings where the machine has them (kvmkit/memory/dirty_ring.py), as file byte runs."""

from kvmkit.memory.dirty_ring import DirtyRings
from kvmkit.memory.guest_memory import GuestMemory
from kvmkit.memory.layout import PAGE_SIZE

Run = tuple[int, int]  # (offset into the guest RAM file, length in bytes)


_LEVELS = (4096, 512, 64)  # bitmap bytes compared at once: 128, 16, then 2 MiB of RAM
_ZERO = bytes(_LEVELS[0])
_ONES = b"\xff" * _LEVELS[0]


class _Runs:
    """Collects runs of set pages given in ascending order, joining neighbours."""

    def __init__(self) -> None:
        self.pairs: list[tuple[int, int]] = []
        self.start = self.end = -1

    def add(self, first: int, end: int) -> None:
        if first == self.end:
            self.end = end
            return
        if self.start >= 0:
            self.pairs.append((self.start, self.end))
        self.start, self.end = first, end

    def done(self) -> list[tuple[int, int]]:
        if self.start >= 0:
            self.pairs.append((self.start, self.end))
            self.start = self.end = -1
        return self.pairs


def bitmap_runs(bitmap: bytes | bytearray, base_offset: int, npages: int) -> list[Run]:
    """Runs of set bits (little-endian bit order, one bit per page) as byte runs.

    Blocks of the bitmap with no bit set, or every bit set, are passed by one
    comparison each (4 KiB of bitmap, then 512 and 64 bytes), so the cost follows the dirty
    pages, not the guest's size; mixed blocks are walked a word at a time, a run of
    set bits per step."""
    runs = _Runs()
    words = memoryview(bitmap).cast("Q")

    def scan(first: int, end: int, level: int) -> None:
        if level == len(_LEVELS):
            for w in range(first // 8, end // 8):
                word, base = words[w], w * 64
                while word:
                    low = (word & -word).bit_length() - 1
                    word >>= low
                    ones = (~word & (word + 1)).bit_length() - 1
                    runs.add(base + low, base + low + ones)
                    word >>= ones
                    base += low + ones
            return
        size = _LEVELS[level]
        for at in range(first, end, size):
            stop = min(at + size, end)
            piece = bitmap[at:stop]
            if piece == _ZERO[: stop - at]:
                continue
            if piece == _ONES[: stop - at]:
                runs.add(at * 8, stop * 8)
            else:
                scan(at, stop, level + 1)

    scan(0, len(words) * 8, 0)
    out = []
    for first, end in runs.done():
        if first < npages:
            end = min(end, npages)
            out.append((base_offset + first * PAGE_SIZE, (end - first) * PAGE_SIZE))
    return out


def merge_runs(*groups: list[Run]) -> list[Run]:
    """The union of byte runs, sorted, with touching and overlapping runs joined."""
    merged: list[Run] = []
    for offset, length in sorted(run for group in groups for run in group):
        if merged and offset <= merged[-1][0] + merged[-1][1]:
            last_offset, last_length = merged[-1]
            merged[-1] = (last_offset, max(last_length, offset + length - last_offset))
        else:
            merged.append((offset, length))
    return merged


def run_bytes(runs: list[Run]) -> int:
    return sum(length for _, length in runs)


class DirtyLog:
    """Dirty tracking over all guest RAM: `start()`, then `collect()` for the pages
    written since the last call (KVM_GET_DIRTY_LOG re-arms the bitmap; a ring harvest
    is followed by KVM_RESET_DIRTY_RINGS), then `stop()`. With `rings` (the VM was
    built with a dirty ring) the rings are used, else the bitmap."""

    def __init__(self, memory: GuestMemory, rings: DirtyRings | None = None) -> None:
        self.memory = memory
        self.rings = rings
        self.active = False
        self.how = ""
        self.ring_losses = 0  # collects that fell back to every populated page

    @property
    def method(self) -> str:
        return "dirty ring" if self.rings is not None else "bitmap"

    @property
    def needs_pause(self) -> bool:
        """guest_memfd slots are swapped, not flagged: the vCPUs must be paused."""
        return self.memory.backend_name == "guest_memfd"

    def start(self) -> None:
        if self.rings is not None:
            self.rings.discard()  # entries from an earlier logging period
        slots = self.memory.log_dirty(True)
        self.memory.track_host_writes(True)  # device writes (virtio) are not in KVM's log
        self.active = True
        self.how = f"{self.method}, {slots}"

    def collect(self) -> list[Run]:
        return merge_runs(self._collect_kvm(), self.memory.host_dirty_runs())

    def _collect_kvm(self) -> list[Run]:
        if self.rings is not None:
            runs = self.rings.collect()
            if not self.rings.lost:
                return runs
            # A ring overflowed and dropped pages: count every populated page as dirty.
            self.rings.lost = False
            self.ring_losses += 1
            extents, _ = self.memory.populated_extents()
            return [(e.offset, e.length) for e in extents]
        runs = []
        for region in self.memory.regions:
            npages = region.size // PAGE_SIZE
            bitmap = self.memory.vm.get_dirty_log(region.slot, npages)
            runs += bitmap_runs(bitmap, region.offset, npages)
        return runs

    def stop(self) -> None:
        if self.active:
            self.memory.track_host_writes(False)
            self.memory.log_dirty(False)
            self.active = False
            if self.rings is not None:
                self.rings.discard()
