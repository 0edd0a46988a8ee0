"""Guest pages on the migration stream.

A PAGES section holds runs of 4 KiB pages of the guest RAM file: `u32 count`, then
`count` records `u64 file offset, u32 pages, u32 kind` (0: the data follows, 1: zero
pages, sent as a marker only), then the data of the data runs, in order. A section
carries at most `SECTION_DATA_BYTES` of data. An ITERATION section (JSON) opens each
pre-copy iteration.
"""

import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from kvmkit.memory import GuestMemory
from kvmkit.memory.layout import PAGE_SIZE
from kvmkit.snapshot.format import (
    PAGES,
    PayloadCursor,
    StreamFormatError,
    StreamWriter,
)

DATA, ZERO = 0, 1
SECTION_DATA_BYTES = 4 << 20
_COUNT = struct.Struct("<I")
_RUN = struct.Struct("<QII")
_ZERO_PAGE = bytes(PAGE_SIZE)


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
                    records.append(_RUN.pack(off, pages, ZERO))
                    stats.zero_pages += pages
                    continue
                rel = off - offset - at
                src = piece[rel : rel + pages * PAGE_SIZE]
                stats.data_bytes += len(src)
                while src:
                    if used == SECTION_DATA_BYTES:
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


def receive_pages(cursor: PayloadCursor, memory: GuestMemory) -> PageStats:
    """Read a PAGE section straight into guest RAM: the records first (each checked to
    lie inside guest RAM), then each data run into its place, without a staging
    buffer. Zero runs are punched out (the pages read back as zeros and need no memory
    here). The section's checksum is verified at the end (`cursor.finish()`); a machine
    that received a damaged section is discarded, never run."""
    stats = PageStats()
    (count,) = _COUNT.unpack(cursor.read(_COUNT.size))
    if count * _RUN.size > cursor.left:
        raise StreamFormatError(f"page section: {count} records do not fit its payload")
    table = cursor.read(count * _RUN.size)
    records = [_RUN.unpack_from(table, i * _RUN.size) for i in range(count)]
    for i, (offset, pages, kind) in enumerate(records):
        if offset % PAGE_SIZE or offset + pages * PAGE_SIZE > memory.size_bytes or kind > ZERO:
            raise StreamFormatError(
                f"page section: record {i} ({offset:#x}, {pages} pages, kind {kind}) is outside"
                " guest RAM or malformed"
            )
    for offset, pages, kind in records:
        size = pages * PAGE_SIZE
        if kind == DATA:
            cursor.readinto(memory.file_view(offset, size))
            stats.data_bytes += size
        else:
            memory.zero_file_range(offset, size)
            stats.zero_pages += pages
        stats.pages += pages
    cursor.finish()
    return stats
