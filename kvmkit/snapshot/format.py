"""The kvmkit state stream: one format for snapshot files and migration streams.

    prelude   magic "KVMKITST", u32 format version, u32 header length,
              header (UTF-8 JSON), u32 CRC32 of version..header
    section*  u32 tag, u16 flags, u16 reserved (0), u64 stored length, u64 raw length,
              u32 CRC32 of those 24 bytes; then the payload (stored length bytes);
              then u32 CRC32 of the payload
    END       a section whose payload is u32 section count + u64 stream bytes before it

Every byte is covered by a checksum, so a flipped bit anywhere is caught and named.
The prelude layout never changes between format versions, so any kvmkit can tell a
newer file from a damaged one. The checksum trails the payload so a writer can
stream a payload (guest memory) without a second pass; a large payload's CRC is
computed on a helper thread while the payload is written.
"""

import json
import os
import struct
import zlib
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from kvmkit.errors import KvmkitError

MAGIC = b"KVMKITST"
FORMAT_VERSION = 1
MAX_HEADER_BYTES = 1 << 20
MAX_SECTION_BYTES = 1 << 34

_PRELUDE = struct.Struct("<8sII")  # magic, version, header length
_CRC = struct.Struct("<I")
_SECTION = struct.Struct("<4sHHQQ")  # tag, flags, reserved, stored length, raw length
_END = struct.Struct("<IQ")
END_BYTES = _END.size

FLAG_ZSTD = 0x1
KNOWN_FLAGS = FLAG_ZSTD
PARALLEL_CRC_BYTES = 1 << 20  # payloads at least this big get their CRC on a helper thread

# Section tags, and what a person calls them in an error message.
MACHINE = b"MACH"
VCPU = b"VCPU"
VM = b"VMST"
DEVICES = b"DEVS"
MEMORY = b"MEM "
END = b"END "
PAGES = b"PAGE"  # migration: runs of guest pages (kvmkit/migration/pages.py)
ITERATION = b"ITER"  # migration: a pre-copy iteration begins
SECTION_NAMES = {
    MACHINE: "machine description",
    VCPU: "vCPU state",
    VM: "VM state",
    DEVICES: "device state",
    MEMORY: "memory",
    END: "end marker",
    PAGES: "guest pages",
    ITERATION: "pre-copy iteration",
}


class StreamFormatError(KvmkitError):
    """A stream or file that is not a complete, intact kvmkit state stream."""


def section_label(tag: bytes) -> str:
    return SECTION_NAMES.get(tag, f"unknown tag {tag!r}")


def zstd_available() -> bool:
    try:
        import zstandard  # noqa: F401
    except ImportError:
        return False
    return True


def _zstd() -> Any:  # noqa: ANN401 (an optional module)
    try:
        import zstandard
    except ImportError:
        raise KvmkitError(
            "zstd compression needs the zstandard package: pip install 'kvmkit[zstd]'"
        ) from None
    return zstandard


class Sink(Protocol):
    def write(self, data: bytes | memoryview, /) -> int | None: ...


class Source(Protocol):
    def readinto(self, buffer: memoryview, /) -> int | None: ...


@dataclass
class SectionHead:
    index: int  # 0-based position among the sections
    tag: bytes
    flags: int
    stored_bytes: int
    raw_bytes: int
    offset: int  # stream offset of the section head

    @property
    def label(self) -> str:
        return f"section {self.index} ({section_label(self.tag)}, at byte {self.offset})"

    @property
    def payload_offset(self) -> int:
        return self.offset + _SECTION.size + _CRC.size


SECTION_OVERHEAD = _SECTION.size + 2 * _CRC.size


# -- writing ------------------------------------------------------------------------
class StreamWriter:
    """Writes a header and sections to `sink`. `end()` seals the stream; a stream
    without its END section is, by construction, incomplete."""

    def __init__(self, sink: Sink, compress_level: int | None = None) -> None:
        self.sink = sink
        self.offset = 0
        self.sections = 0
        self._compressor = _zstd().ZstdCompressor(level=compress_level) if compress_level else None
        self._pool: ThreadPoolExecutor | None = None

    def _write(self, data: bytes | memoryview) -> None:
        self.sink.write(data)
        self.offset += len(data)

    def write_header(self, header: dict[str, Any]) -> None:
        body = json.dumps(header, sort_keys=True).encode()
        prelude = _PRELUDE.pack(MAGIC, FORMAT_VERSION, len(body))
        crc = zlib.crc32(body, zlib.crc32(prelude[8:]))
        self._write(prelude + body + _CRC.pack(crc))

    def write_section(
        self, tag: bytes, parts: Iterable[bytes | memoryview], compress: bool = False
    ) -> None:
        """One section whose payload is the concatenation of `parts` (written as given,
        without copying, unless compressed)."""
        views = [memoryview(p).cast("B") for p in parts]
        raw = sum(len(p) for p in views)
        flags = 0
        if compress and self._compressor is not None:
            packed = self._compressor.compress(b"".join(views))
            if len(packed) < raw:
                views, flags = [memoryview(packed)], FLAG_ZSTD
        stored = sum(len(p) for p in views)
        head = _SECTION.pack(tag, flags, 0, stored, raw)
        self._write(head + _CRC.pack(zlib.crc32(head)))
        crc = 0
        if stored >= PARALLEL_CRC_BYTES:
            crc = self._parallel_crc(views)
        else:
            for p in views:
                self._write(p)
                crc = zlib.crc32(p, crc)
        self._write(_CRC.pack(crc))
        self.sections += 1

    def _parallel_crc(self, parts: list[memoryview]) -> int:
        """Write the parts while a helper thread checksums them (both release the GIL)."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="kvmkit-crc")

        def checksum() -> int:
            crc = 0
            for p in parts:
                crc = zlib.crc32(p, crc)
            return crc

        future = self._pool.submit(checksum)
        try:
            for p in parts:
                self._write(p)
        finally:
            crc = future.result()
        return crc

    def end(self) -> None:
        self.write_section(END, [_END.pack(self.sections, self.offset)])
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


# -- reading ------------------------------------------------------------------------
class StreamReader:
    """Reads and verifies a stream. Every problem raises `StreamFormatError` naming the
    section, its byte offset and what is wrong."""

    def __init__(self, source: Source, what: str = "the snapshot") -> None:
        self.source = source
        self.what = what
        self.offset = 0
        self.sections = 0
        self.header: dict[str, Any] = {}
        self.version = 0
        self.ended = False
        self.heads: list[SectionHead] = []
        self._decompressor: Any = None

    def _read_exact(self, view: memoryview, where: str) -> None:
        got = 0
        while got < len(view):
            n = self.source.readinto(view[got:])
            if not n:
                raise StreamFormatError(
                    f"{self.what} is truncated: it ends inside {where}, at byte"
                    f" {self.offset + got} ({len(view) - got} bytes missing)"
                )
            got += n
        self.offset += got

    def _read(self, size: int, where: str) -> bytes:
        buf = bytearray(size)
        self._read_exact(memoryview(buf), where)
        return bytes(buf)

    def read_header(self) -> dict[str, Any]:
        prelude = self._read(_PRELUDE.size, "the file header")
        magic, version, length = _PRELUDE.unpack(prelude)
        if magic != MAGIC:
            raise StreamFormatError(
                f"{self.what} is not a kvmkit state stream: it starts with {magic!r}, not"
                f" {MAGIC!r} (header, byte 0)"
            )
        if length > MAX_HEADER_BYTES:
            raise StreamFormatError(
                f"{self.what}: header length {length} is implausible (over"
                f" {MAX_HEADER_BYTES} bytes): the header is damaged (byte 12)"
            )
        body = self._read(length, "the file header")
        (crc,) = _CRC.unpack(self._read(_CRC.size, "the file header"))
        computed = zlib.crc32(body, zlib.crc32(prelude[8:]))
        if crc != computed:
            raise StreamFormatError(
                f"{self.what}: header checksum mismatch (stored {crc:#010x}, computed"
                f" {computed:#010x}): the header (bytes 0-{self.offset}) is corrupted"
            )
        if version > FORMAT_VERSION:
            raise StreamFormatError(
                f"{self.what} has format version {version}, newer than this kvmkit reads"
                f" ({FORMAT_VERSION}): upgrade kvmkit to restore it"
            )
        if version < 1:
            raise StreamFormatError(f"{self.what}: format version {version} is not valid")
        try:
            header = json.loads(body)
        except ValueError as e:
            raise StreamFormatError(f"{self.what}: header is not valid JSON ({e})") from None
        if not isinstance(header, dict):
            raise StreamFormatError(f"{self.what}: header is not a JSON object")
        self.version = version
        self.header = header
        return header

    def next_section(self) -> SectionHead:
        """The next section's head (the payload is read with `read_payload` or skipped
        with `skip_payload`)."""
        if self.ended:
            raise StreamFormatError(f"{self.what}: data after the end marker")
        start = self.offset
        where = f"the head of section {self.sections} (at byte {start})"
        raw_head = self._read(_SECTION.size, where)
        (crc,) = _CRC.unpack(self._read(_CRC.size, where))
        if zlib.crc32(raw_head) != crc:
            raise StreamFormatError(
                f"{self.what}: section {self.sections} (at byte {start}): head checksum"
                " mismatch: the section head is corrupted"
            )
        tag, flags, reserved, stored, raw = _SECTION.unpack(raw_head)
        head = SectionHead(self.sections, tag, flags, stored, raw, start)
        if tag not in SECTION_NAMES:
            raise StreamFormatError(f"{self.what}: {head.label}: unknown section tag {tag!r}")
        if flags & ~KNOWN_FLAGS or reserved:
            raise StreamFormatError(
                f"{self.what}: {head.label}: unknown flags {flags:#x}: written by a newer kvmkit?"
            )
        if stored > MAX_SECTION_BYTES or raw > MAX_SECTION_BYTES:
            raise StreamFormatError(f"{self.what}: {head.label}: implausible length {stored}")
        if not flags & FLAG_ZSTD and raw != stored:
            raise StreamFormatError(
                f"{self.what}: {head.label}: raw length {raw} differs from stored {stored}"
            )
        self.sections += 1
        self.heads.append(head)
        return head

    def read_payload(self, head: SectionHead, into: memoryview | None = None) -> memoryview:
        """Read, verify and (if needed) decompress a payload; into `into` when given
        (it must be exactly the raw length), else into a new buffer."""
        if into is not None and len(into) != head.raw_bytes:
            raise StreamFormatError(
                f"{self.what}: {head.label}: payload is {head.raw_bytes} bytes, expected"
                f" {len(into)}"
            )
        stored = into if into is not None and not head.flags & FLAG_ZSTD else None
        if stored is None:
            stored = memoryview(bytearray(head.stored_bytes))
        self._read_exact(stored, head.label)
        (crc,) = _CRC.unpack(self._read(_CRC.size, head.label))
        self._verify(head, stored, crc)
        if head.flags & FLAG_ZSTD:
            stored = self._decompress(head, stored)
            if into is not None:
                into[:] = stored
                stored = into
        if head.tag == END:
            self._check_end(head, stored)
        return stored

    def open_payload(self, head: SectionHead) -> "PayloadCursor":
        """Read an uncompressed payload piece by piece, into buffers the caller chooses
        (guest RAM, for migration), checksummed as it comes; `finish()` verifies it."""
        if head.flags & FLAG_ZSTD:
            raise StreamFormatError(f"{self.what}: {head.label}: a compressed section here")
        return PayloadCursor(self, head)

    def read_payload_unverified(self, head: SectionHead, into: memoryview) -> Callable[[], None]:
        """Read an uncompressed payload into `into` and return the check to run on it
        (raising StreamFormatError), so a caller can checksum one payload on another
        thread while reading the next."""
        if head.flags & FLAG_ZSTD or len(into) != head.raw_bytes:
            self.read_payload(head, into)
            return lambda: None
        self._read_exact(into, head.label)
        (crc,) = _CRC.unpack(self._read(_CRC.size, head.label))
        return lambda: self._verify(head, into, crc)

    def _verify(self, head: SectionHead, payload: memoryview, crc: int) -> None:
        computed = zlib.crc32(payload)
        if crc != computed:
            raise StreamFormatError(
                f"{self.what}: {head.label}: checksum mismatch (stored {crc:#010x}, computed"
                f" {computed:#010x}): the {section_label(head.tag)} data is corrupted"
            )

    def pread_section(self, fd: int, head: SectionHead) -> memoryview:
        """Read one whole section by position (random access into a file, in one read),
        check that its head is the one expected, verify and return its payload. The
        stream position does not move."""
        size = SECTION_OVERHEAD + head.stored_bytes
        data = os.pread(fd, size, head.offset)
        if len(data) != size:
            raise StreamFormatError(f"{self.what} is truncated: it ends inside {head.label}")
        raw_head = data[: _SECTION.size]
        (head_crc,) = _CRC.unpack_from(data, _SECTION.size)
        if zlib.crc32(raw_head) != head_crc or _SECTION.unpack(raw_head) != (
            head.tag,
            head.flags,
            0,
            head.stored_bytes,
            head.raw_bytes,
        ):
            raise StreamFormatError(
                f"{self.what}: {head.label}: the section head is corrupted or not where the"
                " memory index puts it"
            )
        payload = memoryview(data)[_SECTION.size + _CRC.size : size - _CRC.size]
        (crc,) = _CRC.unpack_from(data, size - _CRC.size)
        self._verify(head, payload, crc)
        if head.tag == END:
            self._check_end(head, payload)
        return self._decompress(head, payload) if head.flags & FLAG_ZSTD else payload

    def _decompress(self, head: SectionHead, data: memoryview) -> memoryview:
        if self._decompressor is None:
            self._decompressor = _zstd().ZstdDecompressor()
        try:
            raw = self._decompressor.decompress(data, max_output_size=head.raw_bytes)
        except Exception as e:  # zstandard raises its own ZstdError
            raise StreamFormatError(f"{self.what}: {head.label}: cannot decompress: {e}") from None
        if len(raw) != head.raw_bytes:
            raise StreamFormatError(
                f"{self.what}: {head.label}: decompressed to {len(raw)} bytes, expected"
                f" {head.raw_bytes}"
            )
        return memoryview(raw)

    def _check_end(self, head: SectionHead, payload: memoryview) -> None:
        count, offset = _END.unpack(payload)
        if count != head.index or offset != head.offset:
            raise StreamFormatError(
                f"{self.what}: {head.label}: end marker counts {count} sections and"
                f" {offset} bytes, but the stream had {head.index} and {head.offset}"
            )
        self.ended = True

    def skip_payload(self, head: SectionHead, seek: Callable[[int], object] | None = None) -> None:
        """Move past a payload without verifying it: with `seek` (files), or by reading."""
        size = head.stored_bytes + _CRC.size
        if seek is not None:
            seek(self.offset + size)
            self.offset += size
            return
        chunk = memoryview(bytearray(min(size, 1 << 20)))
        while size:
            n = min(size, len(chunk))
            self._read_exact(chunk[:n], head.label)
            size -= n


class PayloadCursor:
    """One payload read in pieces (`StreamReader.open_payload`). The checksum of each
    piece is computed on a helper thread while the next is read (both release the GIL);
    a piece must stay unchanged until `finish()`, which checks that the whole payload
    was read and that its checksum matches."""

    def __init__(self, reader: StreamReader, head: SectionHead) -> None:
        self.reader = reader
        self.head = head
        self.left = head.stored_bytes
        self._crc = 0
        self._pending: Any = None  # the future checksumming the previous pieces

    def _take(self, n: int) -> None:
        if n > self.left:
            raise StreamFormatError(
                f"{self.reader.what}: {self.head.label}: its records describe more bytes"
                " than its payload holds"
            )
        self.left -= n

    def _checksum(self, piece: memoryview) -> None:
        if len(piece) < PARALLEL_CRC_BYTES:
            if self._pending is not None:
                self._crc = self._pending.result()
                self._pending = None
            self._crc = zlib.crc32(piece, self._crc)
            return
        before = self._pending
        crc = self._crc

        def chained() -> int:
            return zlib.crc32(piece, before.result() if before is not None else crc)

        self._pending = _crc_pool().submit(chained)

    def read(self, n: int) -> memoryview:
        """The next `n` bytes, in a new buffer."""
        self._take(n)
        view = memoryview(bytearray(n))
        self.reader._read_exact(view, self.head.label)
        self._checksum(view)
        return view

    def readinto(self, view: memoryview) -> None:
        """The next len(view) bytes, into `view`."""
        self._take(len(view))
        self.reader._read_exact(view, self.head.label)
        self._checksum(view)

    def finish(self) -> None:
        if self._pending is not None:
            self._crc = self._pending.result()
            self._pending = None
        if self.left:
            raise StreamFormatError(
                f"{self.reader.what}: {self.head.label}: {self.left} bytes of its payload are"
                " not described by its records"
            )
        (crc,) = _CRC.unpack(self.reader._read(_CRC.size, self.head.label))
        if crc != self._crc:
            raise StreamFormatError(
                f"{self.reader.what}: {self.head.label}: checksum mismatch (stored {crc:#010x},"
                f" computed {self._crc:#010x}): the {section_label(self.head.tag)} data is"
                " corrupted"
            )


_CRC_POOL: ThreadPoolExecutor | None = None


def _crc_pool() -> ThreadPoolExecutor:
    """One helper thread for the checksums of pieces read (see PayloadCursor)."""
    global _CRC_POOL
    if _CRC_POOL is None:
        _CRC_POOL = ThreadPoolExecutor(1, thread_name_prefix="kvmkit-crc-read")
    return _CRC_POOL


# -- small typed payloads -------------------------------------------------------------
_ITEM = struct.Struct("<HI")


def pack_items(items: dict[str, bytes]) -> bytes:
    """name -> bytes, as a self-describing payload (u16 name length, u32 data length)."""
    out = bytearray()
    for name, data in items.items():
        encoded = name.encode()
        out += _ITEM.pack(len(encoded), len(data)) + encoded + bytes(data)
    return bytes(out)


def unpack_items(payload: bytes | memoryview, label: str) -> dict[str, bytes]:
    items: dict[str, bytes] = {}
    view = memoryview(payload)
    at = 0
    while at < len(view):
        if at + _ITEM.size > len(view):
            raise StreamFormatError(f"{label}: item list ends mid-item at byte {at}")
        name_len, data_len = _ITEM.unpack_from(view, at)
        at += _ITEM.size
        end = at + name_len + data_len
        if end > len(view):
            raise StreamFormatError(f"{label}: item at byte {at} runs past the payload")
        name = bytes(view[at : at + name_len]).decode(errors="replace")
        items[name] = bytes(view[at + name_len : end])
        at = end
    return items


def pack_json(value: Any) -> bytes:  # noqa: ANN401 (any JSON value)
    return json.dumps(value, sort_keys=True).encode()


def unpack_json(payload: bytes | memoryview, label: str) -> Any:  # noqa: ANN401
    try:
        return json.loads(bytes(payload))
    except ValueError as e:
        raise StreamFormatError(f"{label}: not valid JSON ({e})") from None
