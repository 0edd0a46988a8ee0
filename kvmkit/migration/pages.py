"""Guest pages on the migration stream.

A PAGES section holds runs of 4 KiB pages of the guest RAM file: `u32 count`, then
`count` records `u64 file offset, u32 pages, u32 kind` (0: the data follows, 1: zero
pages, sent as a marker only), then the data of the data runs, in order. A section
carries at most `SECTION_DATA_BYTES` of data and `MAX_RECORDS` records. An ITERATION
section (JSON, `IterationInfo`) opens each pre-copy iteration.
"""

import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

from kvmkit.memory import GuestMemory
from kvmkit.memory.layout import PAGE_SIZE
from kvmkit.records import bounds, decode
from kvmkit.snapshot.format import (
    PAGES,
    SECTION_LIMITS,
    Payload,
    StreamFormatError,
    StreamWriter,
    unpack_json,
)

DATA, ZERO = 0, 1
SECTION_DATA_BYTES = 4 << 20
MAX_RECORDS = 1 << 16  # per section: a record table of at most 1 MiB
ANNOUNCED_RUNS = 4096  # the first pass tells the target its runs, up to this many
MAX_ITERATIONS = 1 << 20
_COUNT = struct.Struct("<I")
_RUN = struct.Struct("<QII")
_ZERO_PAGE = bytes(PAGE_SIZE)
MAX_SECTION_BYTES = _COUNT.size + MAX_RECORDS * _RUN.size + SECTION_DATA_BYTES
assert MAX_SECTION_BYTES <= SECTION_LIMITS[PAGES]


@dataclass
class PageStats:
    pages: int = 0
    zero_pages: int = 0
    data_bytes: int = 0

    def add(self, other: "PageStats") -> None:
        self.pages += other.pages
        self.zero_pages += other.zero_pages
        self.data_bytes += other.data_bytes


def _zero_pages(view: memoryview) -> list[int]:
    """Indices of the all-zero pages in `view` (whole pages). The first word of every
    page is read in one strided pass; only pages whose first word is 0 are compared."""
    firsts = view.cast("Q")[:: PAGE_SIZE // 8].tolist()
    zeros: list[int] = []
    i = -1
    while True:
        try:
            i = firsts.index(0, i + 1)
        except ValueError:
            return zeros
        if view[i * PAGE_SIZE : (i + 1) * PAGE_SIZE].tobytes() == _ZERO_PAGE:
            zeros.append(i)


def _classify(view: memoryview, offset: int) -> Iterator[tuple[int, int, int]]:
    """Split whole pages into (offset, pages, kind) runs of data and zero pages."""
    pages = len(view) // PAGE_SIZE
    at = 0  # the first page not yet yielded
    zeros = _zero_pages(view)
    k = 0
    while k < len(zeros):
        first = last = zeros[k]
        while k + 1 < len(zeros) and zeros[k + 1] == last + 1:
            k += 1
            last += 1
        if first > at:
            yield offset + at * PAGE_SIZE, first - at, DATA
        yield offset + first * PAGE_SIZE, last + 1 - first, ZERO
        at = last + 1
        k += 1
    if at < pages:
        yield offset + at * PAGE_SIZE, pages - at, DATA


def send_pages(
    writer: StreamWriter,
    memory: GuestMemory,
    runs: list[tuple[int, int]],
    live: bool,
    progress: Callable[[int], None] | None = None,
) -> PageStats:
    """Write `runs` (file offset, length) of guest RAM as PAGE sections. With `live`
    (the guest is running) the data is copied first, so the bytes checksummed are the
    bytes sent; a page the guest changes afterwards is in the next dirty log.
    `progress(bytes of runs done)` is called after each piece."""
    stats = PageStats()
    records: list[bytes] = []
    data: list[memoryview] = []
    scratch = memoryview(bytearray(SECTION_DATA_BYTES)) if live else None
    used = 0
    done = 0

    def flush() -> None:
        nonlocal used
        if records:
            assert len(records) <= MAX_RECORDS and used <= SECTION_DATA_BYTES
            head = _COUNT.pack(len(records)) + b"".join(records)
            writer.write_section(PAGES, [memoryview(head), *data])
        records.clear()
        data.clear()
        used = 0

    for offset, length in runs:
        for at in range(0, length, SECTION_DATA_BYTES):
            piece = memory.file_view(offset + at, min(SECTION_DATA_BYTES, length - at))
            for off, pages, kind in _classify(piece, offset + at):
                stats.pages += pages
                if kind == ZERO:
                    if len(records) == MAX_RECORDS:
                        flush()
                    records.append(_RUN.pack(off, pages, ZERO))
                    stats.zero_pages += pages
                    continue
                rel = off - offset - at
                src = piece[rel : rel + pages * PAGE_SIZE]
                stats.data_bytes += len(src)
                while src:
                    if used == SECTION_DATA_BYTES or len(records) == MAX_RECORDS:
                        flush()
                    part = src[: SECTION_DATA_BYTES - used]
                    if scratch is not None:
                        scratch[used : used + len(part)] = part
                        part = scratch[used : used + len(part)]
                    records.append(_RUN.pack(off, len(part) // PAGE_SIZE, DATA))
                    data.append(part)
                    used += len(part)
                    off += len(part)
                    src = src[len(part) :]
            done += len(piece)
            if progress is not None:
                progress(done)
    flush()
    return stats


def receive_pages(payload: Payload, memory: GuestMemory) -> PageStats:
    """Read a PAGE section straight into guest RAM: the records first (each checked to
    lie inside guest RAM, and their data to fill the payload exactly), then each data
    run into its place, without a staging buffer. Zero runs are punched out (the pages
    read back as zeros and need no memory here). The section's checksum is compared
    on the reader's helper thread meanwhile (`finish(wait=False)`): a mismatch is
    raised by the reader's next section at the latest, and a machine that received a
    damaged section is discarded, never run."""
    reader, head = payload.reader, payload.head
    label = f"{reader.what}: {head.label}"
    stats = PageStats()
    if payload.left < _COUNT.size:
        raise StreamFormatError(f"{label}: {payload.left} bytes, too short for a page section")
    (count,) = _COUNT.unpack(payload.read(_COUNT.size))
    if count > MAX_RECORDS or count * _RUN.size > payload.left:
        raise StreamFormatError(
            f"{label}: {count} records do not fit its payload (at most {MAX_RECORDS})"
        )
    records = list(_RUN.iter_unpack(payload.read(count * _RUN.size)))
    data_bytes = 0
    for i, (offset, pages, kind) in enumerate(records):
        if (
            offset % PAGE_SIZE
            or pages == 0
            or offset + pages * PAGE_SIZE > memory.size_bytes
            or kind not in (DATA, ZERO)
        ):
            raise StreamFormatError(
                f"{label}: record {i} ({offset:#x}, {pages} pages, kind {kind}) is outside"
                " guest RAM or malformed"
            )
        data_bytes += pages * PAGE_SIZE if kind == DATA else 0
    if data_bytes != payload.left:
        raise StreamFormatError(
            f"{label}: its records describe {data_bytes} bytes of page data, but"
            f" {payload.left} follow them"
        )
    for offset, pages, kind in records:
        size = pages * PAGE_SIZE
        if kind == DATA:
            payload.readinto(memory.file_view(offset, size))
            stats.data_bytes += size
        else:
            memory.zero_file_range(offset, size)
            stats.zero_pages += pages
        stats.pages += pages
    payload.finish(wait=False)
    return stats


@dataclass(frozen=True)
class IterationInfo:
    """An ITERATION section: a pass begins (`iteration`, its `bytes`, and, for the
    first, the `runs` the target may allocate ahead), the source asks for `sync`, or
    the `phase` changes ("state": the state sections follow)."""

    iteration: int | None = field(default=None, metadata=bounds(0, MAX_ITERATIONS))
    bytes: int | None = field(default=None, metadata=bounds(0, 1 << 52))
    runs: list[tuple[int, int]] = field(default_factory=list, metadata=bounds(0, ANNOUNCED_RUNS))
    sync: bool = False
    phase: Literal["precopy", "state"] | None = None


def iteration_info(payload: memoryview, memory_bytes: int, label: str) -> IterationInfo:
    """Decode and check an ITERATION payload for a machine of `memory_bytes`."""
    info = decode(IterationInfo, unpack_json(payload, label), label, StreamFormatError)
    if info.bytes is not None and info.bytes > memory_bytes:
        raise StreamFormatError(
            f"{label}: field 'bytes': {info.bytes} is more than the machine's {memory_bytes}"
        )
    for i, (offset, length) in enumerate(info.runs):
        if not (0 <= offset and 0 < length <= memory_bytes - offset):
            raise StreamFormatError(
                f"{label}: field 'runs'[{i}]: [{offset}, {length}] is not within the"
                f" machine's {memory_bytes} bytes"
            )
    return info
