"""virtio-balloon (virtio 1.2, 5.5): take memory back from the guest.

The host sets a target (`num_pages`, 4 KiB pages, in the configuration space; the
driver reports what it holds in `actual`). Queues, in this order, each only if its
feature was negotiated (Linux numbers the queues it uses consecutively):

- inflateq: arrays of 32-bit page frame numbers the guest gave up; kvmkit punches
  them out of the memory backing (`GuestMemory.discard`), so the host gets the
  memory back (on guest_memfd the file's populated bytes drop);
- deflateq: pages the guest takes back; nothing to do (they are refilled on touch);
- statsq (VIRTIO_BALLOON_F_STATS_VQ): the driver's one buffer of (tag u16, value
  u64) statistics; the device keeps it and hands it back to ask for fresh numbers,
  every `stats_interval_s` seconds (a timerfd on the event loop) or on `request_stats`;
- reporting_vq (VIRTIO_BALLOON_F_PAGE_REPORTING): free page ranges the guest
  reports; punched out like inflated pages, then returned.

VIRTIO_BALLOON_F_DEFLATE_ON_OOM is offered when configured: the guest may deflate
under memory pressure. Work per buffer is bounded (`MAX_PFNS` page numbers read).
"""

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

from kvmkit import libc
from kvmkit.devices.irq import IrqLine
from kvmkit.devices.virtio.mmio import VirtioMmioDevice, VirtioState
from kvmkit.devices.virtio.queue import Chain, GuestRam
from kvmkit.errors import KvmkitError
from kvmkit.records import U16, U32, bounds

VIRTIO_ID_BALLOON = 5
QUEUE_SIZE = 128
PAGE = 4096  # VIRTIO_BALLOON_PFN_SHIFT 12
MAX_PFNS = 4096  # page numbers read from one inflate buffer (Linux sends 256)

VIRTIO_BALLOON_F_STATS_VQ = 1
VIRTIO_BALLOON_F_DEFLATE_ON_OOM = 2
VIRTIO_BALLOON_F_PAGE_REPORTING = 5

STAT = struct.Struct("<HQ")
STAT_NAMES = {
    0: "swap_in",
    1: "swap_out",
    2: "major_faults",
    3: "minor_faults",
    4: "free_memory",
    5: "total_memory",
    6: "available_memory",
    7: "disk_caches",
    8: "hugetlb_allocations",
    9: "hugetlb_failures",
}
MAX_STATS = 32


class DiscardableRam(GuestRam, Protocol):
    def discard(self, gpa: int, size: int) -> None:
        """Give [gpa, gpa+size) back to the host; the guest reads zeros after."""


@dataclass(frozen=True)
class BalloonConfig:
    amount_mib: int = field(default=0, metadata=bounds(0, 1 << 32))
    deflate_on_oom: bool = False
    stats_interval_s: int = field(default=0, metadata=bounds(0, 3600))
    free_page_reporting: bool = False

    @classmethod
    def from_spec(cls, spec: object) -> "BalloonConfig":
        """From a kvmkit.machine.resources.BalloonSpec (duck-typed: devices sit below)."""
        return cls(
            int(getattr(spec, "amount_mib")),  # noqa: B009
            bool(getattr(spec, "deflate_on_oom")),  # noqa: B009
            int(getattr(spec, "stats_interval_s")),  # noqa: B009
            bool(getattr(spec, "free_page_reporting")),  # noqa: B009
        )


@dataclass(frozen=True)
class BalloonState:
    transport: VirtioState
    target_pages: int = field(default=0, metadata=bounds(*U32))
    actual_pages: int = field(default=0, metadata=bounds(*U32))
    stats_head: int | None = field(default=None, metadata=bounds(*U16))
    stats: dict[str, int] = field(default_factory=dict, metadata=bounds(0, MAX_STATS))
    inflated_pages: int = field(default=0, metadata=bounds(0, None))
    reported_bytes: int = field(default=0, metadata=bounds(0, None))
    discard_errors: int = field(default=0, metadata=bounds(0, None))


class VirtioBalloon(VirtioMmioDevice):
    kind: ClassVar[str] = "virtio-balloon"
    device_id: ClassVar[int] = VIRTIO_ID_BALLOON
    state_version: ClassVar[int] = 1
    state_type: ClassVar[type] = BalloonState

    def __init__(
        self,
        name: str,
        ram: DiscardableRam,
        irq: IrqLine,
        config: BalloonConfig,
        state: BalloonState | None = None,
    ) -> None:
        self.config = config
        self.discarder = ram
        features = 0
        sizes = [QUEUE_SIZE, QUEUE_SIZE]
        if config.stats_interval_s:
            features |= 1 << VIRTIO_BALLOON_F_STATS_VQ
            sizes.append(QUEUE_SIZE)
        if config.deflate_on_oom:
            features |= 1 << VIRTIO_BALLOON_F_DEFLATE_ON_OOM
        if config.free_page_reporting:
            features |= 1 << VIRTIO_BALLOON_F_PAGE_REPORTING
            sizes.append(QUEUE_SIZE)
        super().__init__(name, ram, irq, features, state.transport if state else None, tuple(sizes))
        s = state or BalloonState(VirtioState(), target_pages=config.amount_mib << 8)
        self.target_pages = s.target_pages
        self.actual_pages = s.actual_pages
        self.stats_head = s.stats_head
        self.stats = dict(s.stats)
        self.inflated_pages = s.inflated_pages
        self.reported_bytes = s.reported_bytes
        self.discard_errors = s.discard_errors
        self.timer_fd = -1
        if config.stats_interval_s:
            self.timer_fd = libc.timerfd(float(config.stats_interval_s))

    def save_state(self) -> BalloonState:
        with self.lock:
            return BalloonState(
                self.transport_state(),
                self.target_pages,
                self.actual_pages,
                self.stats_head,
                dict(self.stats),
                self.inflated_pages,
                self.reported_bytes,
                self.discard_errors,
            )

    def summary(self) -> str:
        reported = f", {self.reported_bytes >> 20} MiB reported free" if self.reported_bytes else ""
        return (
            f"virtio-balloon: holds {self.actual_pages >> 8} MiB (target"
            f" {self.target_pages >> 8}), {self.inflated_pages >> 8} MiB given back in all"
            f"{reported}"
        )

    def release(self) -> None:
        if self.timer_fd >= 0:
            os.close(self.timer_fd)
            self.timer_fd = -1

    # -- the host's side -------------------------------------------------------------------
    def set_target(self, mib: int) -> None:
        """Ask the guest to hold `mib` MiB in the balloon (inflate or deflate to it)."""
        if not 0 <= mib < 1 << 20:
            raise KvmkitError(f"{self.name}: balloon target {mib} MiB is out of range")
        with self.lock:
            self.target_pages = mib << 8
        self.config_changed()

    @property
    def actual_mib(self) -> float:
        return self.actual_pages / 256

    def request_stats(self) -> None:
        """Hand the statistics buffer back so the driver refills it."""
        with self.lock:
            index = self._queue_index(VIRTIO_BALLOON_F_STATS_VQ)
            if not self.active or index is None or self.stats_head is None:
                return
            self.queues[index].push(self.ram, self.stats_head, 0)
            self.stats_head = None
            self.signal_used(index)

    def host_readers(self) -> list[tuple[int, Callable[[], None]]]:
        if self.timer_fd < 0:
            return []

        def tick() -> None:
            try:
                os.read(self.timer_fd, 8)
            except BlockingIOError:
                return
            self.request_stats()

        return [(self.timer_fd, tick)]

    # -- configuration space (5.5.4) --------------------------------------------------------
    def device_config(self) -> bytes:
        return struct.pack("<IIII", self.target_pages, self.actual_pages, 0, 0)

    def device_config_write(self, offset: int, data: bytes) -> None:
        if 4 <= offset and offset + len(data) <= 8:  # actual
            raw = bytearray(self.actual_pages.to_bytes(4, "little"))
            raw[offset - 4 : offset - 4 + len(data)] = data
            self.actual_pages = int.from_bytes(raw, "little")

    # -- queues ----------------------------------------------------------------------------
    def _queue_index(self, feature: int) -> int | None:
        """Where the optional queue of `feature` is, given what was negotiated."""
        index = 2
        for bit in (VIRTIO_BALLOON_F_STATS_VQ, VIRTIO_BALLOON_F_PAGE_REPORTING):
            present = self.has_feature(bit)
            if bit == feature:
                return index if present and index < len(self.queues) else None
            index += present
        return None

    def device_queue(self, index: int) -> None:
        q = self.queues[index]
        stats = self._queue_index(VIRTIO_BALLOON_F_STATS_VQ)
        reporting = self._queue_index(VIRTIO_BALLOON_F_PAGE_REPORTING)
        pushed = False
        while (chain := q.pop(self.ram)) is not None:
            if index == 0:
                self._inflate(chain)
            elif index == stats:
                self._take_stats(chain)
                continue  # kept until the next request for statistics
            elif index == reporting:
                self._report(chain)
            q.push(self.ram, chain.head, 0)
            pushed = True
        if pushed:
            self.signal_used(index)

    def _inflate(self, chain: Chain) -> None:
        data = self.queues[0].read_chain(self.ram, chain, 4 * MAX_PFNS)
        pfns = sorted(set(struct.unpack(f"<{len(data) // 4}I", data[: len(data) // 4 * 4])))
        start = run = 0
        for pfn in pfns:  # contiguous runs, one discard each
            if run and pfn == start + run:
                run += 1
                continue
            if run:
                self._discard(start * PAGE, run * PAGE)
            start, run = pfn, 1
        if run:
            self._discard(start * PAGE, run * PAGE)
        self.inflated_pages += len(pfns)

    def _report(self, chain: Chain) -> None:
        for gpa, length in chain.writable:
            self._discard(gpa, length)
            self.reported_bytes += length

    def _discard(self, gpa: int, size: int) -> None:
        try:
            self.discarder.discard(gpa, size)
        except KvmkitError:  # outside RAM, or not whole backend pages (hugetlb)
            self.discard_errors += 1

    def _take_stats(self, chain: Chain) -> None:
        index = self._queue_index(VIRTIO_BALLOON_F_STATS_VQ)
        assert index is not None
        data = self.queues[index].read_chain(self.ram, chain, STAT.size * MAX_STATS)
        for at in range(0, len(data) - STAT.size + 1, STAT.size):
            tag, value = STAT.unpack_from(data, at)
            key = STAT_NAMES.get(tag, f"tag{tag}")
            if key in self.stats or len(self.stats) < MAX_STATS:
                self.stats[key] = value
        if self.stats_head is not None:  # a second buffer: return the first
            self.queues[index].push(self.ram, self.stats_head, 0)
        self.stats_head = chain.head

    def device_reset(self) -> None:
        self.stats_head = None
        self.actual_pages = 0
