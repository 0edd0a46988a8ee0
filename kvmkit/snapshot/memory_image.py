"""Guest memory in a state stream: only populated pages (found by
`GuestMemory.populated_extents`), in chunks.

The stream holds a MEMORY index section (u64 file offset, u64 length per chunk, in
order) followed by one MEMORY section per chunk holding the chunk's bytes. Chunks are
at most CHUNK_BYTES and never cross a CHUNK_BYTES boundary, so a lazy restore can find
the chunk of any page by arithmetic.
"""

import struct

from kvmkit.memory.population import Extent
from kvmkit.snapshot.format import StreamFormatError

__all__ = ["CHUNK_BYTES", "Extent", "chunked", "pack_index", "unpack_index"]

CHUNK_BYTES = 4 << 20
_EXTENT = struct.Struct("<QQ")


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
