"""Guest memory in a state stream: only populated pages (found by
`GuestMemory.populated_extents`), in chunks.

The stream holds a MEMORY index section (u64 file offset, u64 length per chunk, in
order) followed by one MEMORY section per chunk holding the chunk's bytes. Chunks are
at most CHUNK_BYTES and never cross a CHUNK_BYTES boundary, so a lazy restore can find
the chunk of any page by arithmetic. A chunk holds at least one page, so the index of
a machine of N bytes has at most N / 4096 entries (`index_limit`).
"""

import struct

from kvmkit.memory.layout import PAGE_SIZE
from kvmkit.memory.population import Extent
from kvmkit.snapshot.format import MEMORY, SECTION_LIMITS, StreamFormatError

__all__ = ["CHUNK_BYTES", "Extent", "chunked", "index_limit", "pack_index", "unpack_index"]

CHUNK_BYTES = SECTION_LIMITS[MEMORY]  # a chunk section: 4 MiB
_EXTENT = struct.Struct("<QQ")


def index_limit(memory_bytes: int) -> int:
    """The most bytes the memory index of a machine of `memory_bytes` can hold."""
    return _EXTENT.size * -(-memory_bytes // PAGE_SIZE)


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
    """The chunks, checked: in order, inside guest RAM, none empty or across a chunk
    line (each entry is checked before the next is decoded)."""
    if len(payload) % _EXTENT.size:
        raise StreamFormatError(f"{label}: memory index is not a whole number of entries")
    if len(payload) > index_limit(size_bytes):
        raise StreamFormatError(
            f"{label}: {len(payload) // _EXTENT.size} chunks, more than guest RAM of"
            f" {size_bytes:#x} bytes has pages"
        )
    chunks = []
    last = 0
    for i, (offset, length) in enumerate(_EXTENT.iter_unpack(payload)):
        if offset < last or length <= 0 or offset + length > size_bytes:
            raise StreamFormatError(
                f"{label}: memory chunk {i} ({offset:#x}+{length:#x}) is out of order or"
                f" outside guest RAM ({size_bytes:#x} bytes)"
            )
        if offset // CHUNK_BYTES != (offset + length - 1) // CHUNK_BYTES:
            raise StreamFormatError(
                f"{label}: memory chunk {i} ({offset:#x}+{length:#x}) crosses a chunk line"
            )
        chunks.append(Extent(offset, length))
        last = offset + length
    return chunks
