"""Guest memory in a state stream: only populated pages, in chunks.

Finding populated pages without reading all of guest RAM (measured on 6.18):
- memfd, hugetlb and thp files answer lseek(SEEK_DATA/SEEK_HOLE), whose cost grows
  with the number of extents, not with the memory size;
- guest_memfd gives ESPIPE for lseek, so kvmkit asks mincore() through a transient
  PROT_NONE mapping: one byte per page, exact for every page the guest or host has
  touched (pages only fallocated are not seen, and read as zeros anyway).

The stream holds a MEMORY index section (u64 file offset, u64 length per chunk, in
order) followed by one MEMORY section per chunk holding the chunk's bytes. Chunks are
at most CHUNK_BYTES and never cross a CHUNK_BYTES boundary, so a lazy restore can find
the chunk of any page by arithmetic.
"""

import os
import re
import struct
from dataclasses import dataclass

from kvmkit import libc
from kvmkit.memory import GuestMemory
from kvmkit.snapshot.format import StreamFormatError

CHUNK_BYTES = 4 << 20
_EXTENT = struct.Struct("<QQ")
_RUN = re.compile(rb"[^\x00]+")


@dataclass(frozen=True)
class Extent:
    offset: int  # into the guest RAM file
    length: int

    @property
    def end(self) -> int:
        return self.offset + self.length


def populated_extents(memory: GuestMemory) -> tuple[list[Extent], str]:
    """The populated byte ranges of guest RAM, and how they were found."""
    fd, size = memory.backend.fd, memory.size_bytes
    if memory.backend.name != "guest_memfd":
        try:
            return _seek_extents(fd, size), "lseek(SEEK_DATA/SEEK_HOLE)"
        except OSError:
            pass  # a file system without SEEK_DATA: fall back to mincore
    probe = memory.mappings.map(0, size, "snapshot-probe", prot=0)
    try:
        vec = libc.mincore(probe.addr, probe.size, memory.backend.page_size)
    finally:
        memory.mappings.unmap(probe)
    unit = memory.backend.page_size
    extents = [Extent(m.start() * unit, (m.end() - m.start()) * unit) for m in _RUN.finditer(vec)]
    return extents, "mincore"


def _seek_extents(fd: int, size: int) -> list[Extent]:
    extents = []
    at = 0
    while at < size:
        try:
            start = os.lseek(fd, at, os.SEEK_DATA)
        except OSError as e:
            if e.errno == 6:  # ENXIO: no data after `at`
                break
            raise
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        extents.append(Extent(start, end - start))
        at = end
    return extents


def chunked(extents: list[Extent], chunk: int = CHUNK_BYTES) -> list[Extent]:
    """Split extents at every multiple of `chunk`."""
    out = []
    for e in extents:
        at = e.offset
        while at < e.end:
            stop = min(e.end, (at // chunk + 1) * chunk)
            out.append(Extent(at, stop - at))
            at = stop
    return out


def pack_index(chunks: list[Extent]) -> bytes:
    return b"".join(_EXTENT.pack(c.offset, c.length) for c in chunks)


def unpack_index(payload: bytes | memoryview, size_bytes: int, label: str) -> list[Extent]:
    if len(payload) % _EXTENT.size:
        raise StreamFormatError(f"{label}: memory index is not a whole number of entries")
    chunks = [Extent(o, n) for o, n in _EXTENT.iter_unpack(payload)]
    last = 0
    for c in chunks:
        if c.offset < last or c.end > size_bytes or c.length <= 0:
            raise StreamFormatError(
                f"{label}: memory chunk {c.offset:#x}+{c.length:#x} is out of order or outside"
                f" guest RAM ({size_bytes:#x} bytes)"
            )
        if c.offset // CHUNK_BYTES != (c.end - 1) // CHUNK_BYTES:
            raise StreamFormatError(f"{label}: memory chunk {c.offset:#x} crosses a chunk line")
        last = c.end
    return chunks
