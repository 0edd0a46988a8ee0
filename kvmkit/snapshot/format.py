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
stream a payload (guest memory) without a second pass.

Nothing a stream claims is trusted before it is checked: every section's length is
bounded by its type (SECTION_LIMITS, or a caller's limit: the memory index, by the
machine's size), a file's sections by the bytes left in the file, and payloads are
read in pieces, so a stream costs memory in proportion to the bytes that actually
arrive. Compressed payloads decompress to at most their recorded raw length, and
JSON payloads are refused when nested deeper than MAX_JSON_DEPTH, before parsing.

Reading is one of two ways: in order (`StreamReader.next_section`, then
`open_payload` to read a payload in pieces into buffers of the caller's choosing, or
`read_payload` for all of it), or by position (`pread_section`, for the lazy
restore). Both check the same bounds and give the same messages. Large payloads are
checksummed on a helper thread owned by the reader or writer (stopped by `close()`)
while the next piece moves: zlib.crc32 and the I/O both release the GIL.
"""

import itertools
import json
import os
import struct
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from kvmkit.closing import Closeable
from kvmkit.errors import KvmkitError
from kvmkit.records import bounds, decode

if TYPE_CHECKING:
    from concurrent.futures import Future, ThreadPoolExecutor

MAGIC = b"KVMKITST"
FORMAT_VERSION = 1
MAX_HEADER_BYTES = 1 << 20
MAX_JSON_DEPTH = 32  # kvmkit writes at most 4 levels
MAX_ITEMS = 256  # names in an item payload (VM, VCPU): kvmkit writes about a dozen

_PRELUDE = struct.Struct("<8sII")  # magic, version, header length
_CRC = struct.Struct("<I")
_SECTION = struct.Struct("<4sHHQQ")  # tag, flags, reserved, stored length, raw length
_END = struct.Struct("<IQ")
END_BYTES = _END.size

FLAG_ZSTD = 0x1
KNOWN_FLAGS = FLAG_ZSTD
PIECE_BYTES = 1 << 20  # payloads are read, allocated and checksummed in pieces of this
PARALLEL_CRC_BYTES = 1 << 20  # payloads at least this big get their CRC on a helper thread
ZSTD_MAX_WINDOW = 1 << 23  # a compressed section is at most 4 MiB: no frame needs more

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
MIB = 1 << 20
# The most a section of each type may claim (stored and raw). kvmkit writes a few KiB
# of machine description, VM, vCPU and device state, an ITERATION of at most 4096
# runs (~100 KiB), memory chunks of memory_image.CHUNK_BYTES, and PAGE sections of
# pages.SECTION_DATA_BYTES of data plus at most pages.MAX_RECORDS records. The memory
# index is bounded by the machine's size instead (memory_image.index_limit).
SECTION_LIMITS = {
    MACHINE: MIB,
    VCPU: MIB,
    VM: MIB,
    DEVICES: MIB,
    MEMORY: 4 * MIB,
    END: END_BYTES,
    PAGES: 6 * MIB,
    ITERATION: MIB,
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


def _zstd() -> Any:  # an optional module
    try:
        import zstandard
    except ImportError:
        raise KvmkitError(
            "zstd compression needs the zstandard package: pip install 'kvmkit[zstd]'"
        ) from None
    return zstandard


def size_text(n: int) -> str:
    """A byte count for a message: exact, with a binary unit when it has one."""
    for shift, unit in ((40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")):
        if n >= 1 << shift:
            return f"{n} bytes ({n / (1 << shift):.1f} {unit})"
    return f"{n} bytes"


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

    @property
    def end_offset(self) -> int:
        """The stream offset just past the section (its payload's CRC included)."""
        return self.payload_offset + self.stored_bytes + _CRC.size


SECTION_OVERHEAD = _SECTION.size + 2 * _CRC.size


class _Crc:
    """One payload's running CRC32."""

    value = 0


class Checksummer:
    """CRC32s on one helper thread, in the order asked, while the caller moves the next
    piece. Owned by one reader or writer and stopped by its close(); the thread starts
    with the first large payload."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._pool: ThreadPoolExecutor | None = None
        self._last: Future[None] | None = None

    def then(self, work: Callable[[], None]) -> None:
        """Run `work` on the helper after everything asked before it."""
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor  # only writers that compress

            self._pool = ThreadPoolExecutor(1, thread_name_prefix=self._name)
        self._last = self._pool.submit(work)

    def add(self, crc: _Crc, pieces: list[memoryview]) -> None:
        """Fold `pieces` into `crc`, in order; they must not change until `wait()`."""

        def fold() -> None:
            for piece in pieces:
                crc.value = zlib.crc32(piece, crc.value)

        self.then(fold)

    def wait(self) -> None:
        """Until everything asked is done (one worker: the last is done last)."""
        last, self._last = self._last, None
        if last is not None:
            last.result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._last = None


# -- writing ------------------------------------------------------------------------
class StreamWriter:
    """Writes a header and sections to `sink`. `end()` seals the stream; a stream
    without its END section is, by construction, incomplete."""

    def __init__(self, sink: Sink, compress_level: int | None = None) -> None:
        self.sink = sink
        self.offset = 0
        self.sections = 0
        self._compressor = _zstd().ZstdCompressor(level=compress_level) if compress_level else None
        self._checksums = Checksummer("kvmkit-crc-write")

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
        crc = _Crc()
        if stored >= PARALLEL_CRC_BYTES:  # checksummed on the helper while written
            self._checksums.add(crc, views)
            try:
                for p in views:
                    self._write(p)
            finally:
                self._checksums.wait()
        else:
            for p in views:
                self._write(p)
                crc.value = zlib.crc32(p, crc.value)
        self._write(_CRC.pack(crc.value))
        self.sections += 1

    def end(self) -> None:
        self.write_section(END, [_END.pack(self.sections, self.offset)])
        self.close()

    def close(self) -> None:
        self._checksums.close()


# -- reading ------------------------------------------------------------------------
class StreamReader(Closeable):
    """Reads and verifies a stream. Every problem raises `StreamFormatError` naming the
    section, its byte offset and what is wrong.

    `size`: the bytes the source holds (a file): a section that claims more than is
    left is refused as truncated before it is read, and bytes after the END section
    are refused. `peer`: who sends the stream (a socket): an early end is then "`peer`
    closed the connection" rather than "truncated". `kind` is what the stream is
    called when its magic is wrong ("snapshot", "migration stream"). `keep_heads`
    keeps every section head read in `heads` (for `inspect`; a migration stream's
    reader keeps none, so a long stream costs nothing per section)."""

    def __init__(
        self,
        source: Source,
        what: str = "the snapshot",
        *,
        size: int | None = None,
        peer: str | None = None,
        kind: str = "state stream",
        keep_heads: bool = False,
    ) -> None:
        self.source = source
        self.what = what
        self.size = size
        self.peer = peer
        self.kind = kind
        self.offset = 0
        self.sections = 0
        self.header: dict[str, Any] = {}
        self.version = 0
        self.ended = False
        self.heads: list[SectionHead] = []
        self._keep_heads = keep_heads
        self._checksums = Checksummer("kvmkit-crc-read")
        self._failures: list[str] = []  # checksum mismatches found on the helper

    # -- the bytes ----------------------------------------------------------------------
    def _ended_early(self, where: str, at: int, missing: int) -> StreamFormatError:
        if self.peer is not None:
            return StreamFormatError(
                f"{self.what}: {self.peer} closed the connection at byte {at}, inside {where}"
                f" ({missing} bytes of it never came)"
            )
        return StreamFormatError(
            f"{self.what} is truncated: it ends at byte {at}, inside {where}"
            f" ({missing} bytes missing)"
        )

    def _read_exact(self, view: memoryview, where: str) -> None:
        got = 0
        while got < len(view):
            n = self.source.readinto(view[got:])
            if not n:
                raise self._ended_early(where, self.offset + got, len(view) - got)
            got += n
        self.offset += got

    def _read_new(self, size: int, where: str) -> memoryview:
        """`size` bytes into a new buffer that grows with what arrives (doubling, from
        PIECE_BYTES), so a claimed length costs nothing until its bytes come."""
        buf = bytearray(min(size, PIECE_BYTES))
        with memoryview(buf) as view:
            self._read_exact(view, where)
        while len(buf) < size:
            start = len(buf)
            buf.extend(bytes(min(size - start, start)))
            with memoryview(buf) as view:
                self._read_exact(view[start:], where)
        return memoryview(buf)

    def _read_crc(self, where: str) -> int:
        buf = bytearray(_CRC.size)
        self._read_exact(memoryview(buf), where)
        return int(_CRC.unpack(buf)[0])

    # -- the header ---------------------------------------------------------------------
    def read_header(self) -> dict[str, Any]:
        prelude = bytearray(_PRELUDE.size)
        got = 0
        while got < len(prelude):  # the magic first: a foreign file is named as one
            n = self.source.readinto(memoryview(prelude)[got:])
            if not n:
                break
            got += n
        start = bytes(prelude[: min(got, len(MAGIC))])
        if not MAGIC.startswith(start):
            raise StreamFormatError(
                f"{self.what} is not a kvmkit {self.kind}: it starts with {start!r}, not the"
                f" magic {MAGIC!r}"
            )
        if got < len(prelude):
            raise self._ended_early("the header", got, len(prelude) - got)
        self.offset = got
        magic, version, length = _PRELUDE.unpack(prelude)
        if length > MAX_HEADER_BYTES:
            raise StreamFormatError(
                f"{self.what}: header length {length} is implausible (over"
                f" {MAX_HEADER_BYTES} bytes): the header is damaged (byte 12)"
            )
        self._check_room("the header", length + _CRC.size)
        body = bytes(self._read_new(length, "the header"))
        crc = self._read_crc("the header")
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
        header = unpack_json(body, f"{self.what}: header")
        if not isinstance(header, dict):
            raise StreamFormatError(f"{self.what}: header: is not a JSON object")
        check_header(header, f"{self.what}: header")
        self.version = version
        self.header = header
        return header

    def _check_room(self, where: str, need: int) -> None:
        """For a file: refuse at once what claims more bytes than are left in it."""
        if self.size is not None and self.offset + need > self.size:
            raise self._ended_early(where, self.size, self.offset + need - self.size)

    # -- sections -----------------------------------------------------------------------
    def next_section(self, limit: int | None = None) -> SectionHead:
        """The next section's head, checked against its type's limit (or `limit`) and,
        for a file, against the bytes left; its payload is read next (`open_payload`,
        `read_payload`) or skipped (`skip_payload`)."""
        self._raise_failures()
        if self.ended:
            raise StreamFormatError(f"{self.what}: data after the end marker")
        start = self.offset
        where = f"the head of section {self.sections} (at byte {start})"
        self._check_room(where, _SECTION.size + _CRC.size)
        raw_head = bytearray(_SECTION.size)
        self._read_exact(memoryview(raw_head), where)
        crc = self._read_crc(where)
        if zlib.crc32(raw_head) != crc:
            raise StreamFormatError(
                f"{self.what}: section {self.sections} (at byte {start}): head checksum"
                " mismatch: the section head is corrupted"
            )
        head = SectionHead(self.sections, *self._unpack_head(raw_head), start)
        self._check_head(head, limit)
        self._check_room(head.label, head.stored_bytes + _CRC.size)
        self.sections += 1
        if self._keep_heads:
            self.heads.append(head)
        return head

    @staticmethod
    def _unpack_head(raw_head: bytes | bytearray) -> tuple[bytes, int, int, int]:
        tag, flags, reserved, stored, raw = _SECTION.unpack(raw_head)
        return tag, flags | (reserved << 16), stored, raw  # reserved bits read as flags

    def _check_head(self, head: SectionHead, limit: int | None) -> None:
        """What a head may claim, whichever way it was read."""
        what, tag, stored, raw = self.what, head.tag, head.stored_bytes, head.raw_bytes
        if tag not in SECTION_NAMES:
            raise StreamFormatError(f"{what}: {head.label}: unknown section tag {tag!r}")
        if head.flags & ~KNOWN_FLAGS:
            raise StreamFormatError(
                f"{what}: {head.label}: unknown flags {head.flags:#x}: written by a newer kvmkit?"
            )
        most = SECTION_LIMITS[tag] if limit is None else limit
        if max(stored, raw) > most:
            raise StreamFormatError(
                f"{what}: {head.label}: claims {size_text(max(stored, raw))}, over its limit"
                f" of {size_text(most)}: the stream is damaged or was not written by kvmkit"
            )
        if head.flags & FLAG_ZSTD:
            if tag == END or stored >= raw:
                raise StreamFormatError(
                    f"{what}: {head.label}: a compressed payload of {stored} bytes for {raw}"
                    " raw bytes: the section head is damaged"
                )
        elif raw != stored:
            raise StreamFormatError(
                f"{what}: {head.label}: raw length {raw} differs from stored {stored}"
            )
        if tag == END and raw != END_BYTES:
            raise StreamFormatError(
                f"{what}: {head.label}: an end marker of {raw} bytes, not {END_BYTES}"
            )

    def open_payload(self, head: SectionHead) -> "Payload":
        """The payload of the section just read, to read in pieces (`Payload`)."""
        if head.tag == END:
            raise ValueError("the end marker is read with read_payload")
        return Payload(self, head)

    def read_payload(self, head: SectionHead, into: memoryview | None = None) -> memoryview:
        """A whole payload, verified (as is everything before it) and decompressed: into
        `into` when given (it must be exactly the raw length), else into a new buffer."""
        if into is not None and len(into) != head.raw_bytes:
            raise StreamFormatError(
                f"{self.what}: {head.label}: payload is {head.raw_bytes} bytes, expected"
                f" {len(into)}"
            )
        payload = Payload(self, head)
        if into is None:
            data = payload.read(head.raw_bytes)
        else:
            payload.readinto(into)
            data = into
        payload.finish()
        if head.tag == END:
            self._check_end(head, data)
        return data

    def skip_payload(self, head: SectionHead, seek: Callable[[int], object] | None = None) -> None:
        """Move past a payload without verifying it: with `seek` (files; the head was
        checked against the file's size), or by reading it in pieces."""
        size = head.stored_bytes + _CRC.size
        if seek is not None:
            seek(self.offset + size)
            self.offset += size
            return
        chunk = memoryview(bytearray(min(size, PIECE_BYTES)))
        while size:
            n = min(size, len(chunk))
            self._read_exact(chunk[:n], head.label)
            size -= n

    def pread_section(self, fd: int, head: SectionHead) -> memoryview:
        """Read one whole section by its position in the file (random access, in one
        read): its head must be the one expected; the same limits as `next_section`
        apply; its payload is verified and returned. The stream position does not
        move."""
        self._check_head(head, None)
        if self.size is not None and head.end_offset > self.size:
            raise self._ended_early(head.label, self.size, head.end_offset - self.size)
        size = SECTION_OVERHEAD + head.stored_bytes
        data = os.pread(fd, size, head.offset)
        if len(data) != size:
            raise self._ended_early(head.label, head.offset + len(data), size - len(data))
        raw_head = data[: _SECTION.size]
        (head_crc,) = _CRC.unpack_from(data, _SECTION.size)
        if zlib.crc32(raw_head) != head_crc or self._unpack_head(raw_head) != (
            head.tag,
            head.flags,
            head.stored_bytes,
            head.raw_bytes,
        ):
            raise StreamFormatError(
                f"{self.what}: {head.label}: the section head is corrupted or not where the"
                " memory index puts it"
            )
        payload = memoryview(data)[_SECTION.size + _CRC.size : size - _CRC.size]
        (crc,) = _CRC.unpack_from(data, size - _CRC.size)
        self._compare(head, crc, zlib.crc32(payload), raise_now=True)
        if head.tag == END:
            self._check_end(head, payload)
        return self._decompress(head, payload) if head.flags & FLAG_ZSTD else payload

    # -- checks -------------------------------------------------------------------------
    def _compare(self, head: SectionHead, stored: int, computed: int, raise_now: bool) -> None:
        if stored == computed:
            return
        message = (
            f"{self.what}: {head.label}: checksum mismatch (stored {stored:#010x}, computed"
            f" {computed:#010x}): the {section_label(head.tag)} data is corrupted"
        )
        if raise_now:
            raise StreamFormatError(message)
        self._failures.append(message)

    def _raise_failures(self) -> None:
        if self._failures:
            raise StreamFormatError(self._failures[0])

    def settle(self) -> None:
        """Wait for the checksums still running on the helper; raise the first
        mismatch."""
        self._checksums.wait()
        self._raise_failures()

    def _decompress(self, head: SectionHead, data: memoryview) -> memoryview:
        """At most the raw length: a frame that declares another size is refused
        before it is decompressed, and one without a size is cut off at the raw
        length."""
        zstd = _zstd()
        # One decompressor per payload: the lazy restore's threads call pread_section
        # at once, and a zstd context is not for two threads (it costs microseconds).
        decompressor = zstd.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW)
        try:
            declared = zstd.frame_content_size(data)
            if declared not in (-1, head.raw_bytes):
                raise StreamFormatError(
                    f"{self.what}: {head.label}: its compressed data declares"
                    f" {size_text(declared)}, the section {head.raw_bytes}: refused without"
                    " decompressing"
                )
            raw = decompressor.decompress(data, max_output_size=head.raw_bytes)
        except zstd.ZstdError as e:
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
        if self.size is not None and self.size > head.end_offset:
            raise StreamFormatError(
                f"{self.what}: {self.size - head.end_offset} bytes after the end marker: the"
                f" file was appended to or damaged (the end marker ends at byte"
                f" {head.end_offset})"
            )
        self.ended = True

    def close(self) -> None:
        """Stop the checksum helper (after the work it holds: pieces it checksums may be
        guest RAM that the caller unmaps next)."""
        self._checksums.close()


class Payload:
    """One payload read in order, in pieces (`StreamReader.open_payload`): `read(n)`
    into a new buffer, `readinto(view)` into the caller's, then `finish()`, which
    checks that all of it was read and that its checksum matches. A big uncompressed
    payload is checksummed on the reader's helper thread while the next piece is read:
    a piece must stay unchanged until the payload is verified. A compressed payload is
    read, verified and decompressed whole (it is at most SECTION_LIMITS[MEMORY])."""

    def __init__(self, reader: StreamReader, head: SectionHead) -> None:
        self.reader = reader
        self.head = head
        self.left = head.raw_bytes
        self._crc = _Crc()
        self._on_helper = head.stored_bytes >= PARALLEL_CRC_BYTES
        self._batch: list[memoryview] = []  # pieces not yet handed to the helper
        self._batch_bytes = 0
        self._plain: memoryview | None = None
        self._at = 0
        if head.flags & FLAG_ZSTD:
            stored = reader._read_new(head.stored_bytes, head.label)
            crc = reader._read_crc(head.label)
            reader._compare(head, crc, zlib.crc32(stored), raise_now=True)
            self._plain = reader._decompress(head, stored)

    def _take(self, n: int) -> None:
        if n > self.left:
            raise StreamFormatError(
                f"{self.reader.what}: {self.head.label}: its contents describe more bytes"
                f" than its payload holds ({n} more asked, {self.left} left)"
            )
        self.left -= n

    def _checksum(self, piece: memoryview) -> None:
        """Small pieces (a page run) go to the helper in batches of PIECE_BYTES, so a
        section of many short runs costs few hand-overs."""
        if not self._on_helper:
            self._crc.value = zlib.crc32(piece, self._crc.value)
            return
        self._batch.append(piece)
        self._batch_bytes += len(piece)
        if self._batch_bytes >= PIECE_BYTES:
            self._hand_over()

    def _hand_over(self) -> None:
        if self._batch:
            self.reader._checksums.add(self._crc, self._batch)
            self._batch, self._batch_bytes = [], 0

    def read(self, n: int) -> memoryview:
        """The next `n` bytes, in a new buffer."""
        self._take(n)
        if self._plain is not None:
            self._at += n
            return self._plain[self._at - n : self._at]
        view = self.reader._read_new(n, self.head.label)
        self._checksum(view)
        return view

    def readinto(self, view: memoryview) -> None:
        """The next len(view) bytes, into `view` (in as few reads as the source allows:
        one 4 MiB read of a cold file beats four of 1 MiB; its checksum overlaps the
        reading of what comes next)."""
        view = view.cast("B") if view.format != "B" else view
        self._take(len(view))
        if self._plain is not None:
            view[:] = self._plain[self._at : self._at + len(view)]
            self._at += len(view)
            return
        self.reader._read_exact(view, self.head.label)
        self._checksum(view)

    def finish(self, wait: bool = True) -> None:
        """All read: read the stored checksum and compare. `wait=False` leaves a
        comparison still running on the helper to finish meanwhile; a mismatch is then
        raised by a later call on the reader, at the latest by the END section's
        `read_payload` (or `settle()`)."""
        reader, head = self.reader, self.head
        if self.left:
            raise StreamFormatError(
                f"{reader.what}: {head.label}: {self.left} bytes of its payload are not"
                " described by its contents"
            )
        if self._plain is None:
            stored = reader._read_crc(head.label)
            if self._on_helper:
                self._hand_over()
                crc = self._crc
                reader._checksums.then(lambda: reader._compare(head, stored, crc.value, False))
            else:
                reader._compare(head, stored, self._crc.value, raise_now=True)
        if wait:
            reader.settle()


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
    """The items of a `pack_items` payload: each name once, UTF-8, at most MAX_ITEMS."""
    items: dict[str, bytes] = {}
    view = memoryview(payload).cast("B")
    at = 0
    while at < len(view):
        if len(items) == MAX_ITEMS:
            raise StreamFormatError(f"{label}: more than {MAX_ITEMS} items")
        if at + _ITEM.size > len(view):
            raise StreamFormatError(f"{label}: item list ends mid-item at byte {at}")
        name_len, data_len = _ITEM.unpack_from(view, at)
        at += _ITEM.size
        end = at + name_len + data_len
        if end > len(view):
            raise StreamFormatError(f"{label}: item at byte {at} runs past the payload")
        try:
            name = bytes(view[at : at + name_len]).decode()
        except UnicodeDecodeError:
            raise StreamFormatError(f"{label}: item name at byte {at} is not UTF-8") from None
        if name in items:
            raise StreamFormatError(f"{label}: item {name!r} appears twice")
        items[name] = bytes(view[at + name_len : end])
        at = end
    return items


def pack_json(value: Any) -> bytes:  # any JSON value
    return json.dumps(value, sort_keys=True).encode()


# JSON nesting, counted without parsing: escapes and strings removed, then +1 per
# opening and -1 per closing bracket (as signed bytes), and the running maximum.
_BRACKETS = b"[]{}"
_NOT_BRACKETS = bytes(c for c in range(256) if c not in _BRACKETS)
_DEPTH_STEPS = bytes.maketrans(_BRACKETS, b"\x01\xff\x01\xff")


def json_depth(data: bytes) -> int:
    """How deep `data` nests (brackets in strings do not count), at C speed."""
    unescaped = data.replace(b"\\\\", b"").replace(b'\\"', b"")
    outside = b"".join(unescaped.split(b'"')[0::2])
    steps = outside.translate(_DEPTH_STEPS, _NOT_BRACKETS)
    return max(0, max(itertools.accumulate(memoryview(steps).cast("b")), default=0))


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def unpack_json(payload: bytes | memoryview, label: str) -> Any:  # any JSON value
    """JSON, refused when nested deeper than MAX_JSON_DEPTH (before parsing) or when it
    holds NaN or Infinity."""
    data = bytes(payload)
    few = data.count(b"[") + data.count(b"{") <= MAX_JSON_DEPTH  # cannot nest deeper
    depth = 0 if few else json_depth(data)
    if depth > MAX_JSON_DEPTH:
        raise StreamFormatError(
            f"{label}: JSON nested {depth} deep, deeper than the {MAX_JSON_DEPTH} a kvmkit"
            " stream may hold"
        )
    try:
        return json.loads(data, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:
        raise StreamFormatError(f"{label}: not valid JSON ({e})") from None


# -- the header, typed ------------------------------------------------------------------
CAPABILITY_MAX = (1 << 64) - 1


@dataclass(frozen=True)
class HostCpuRecord:
    arch: str = field(default="", metadata=bounds(0, 64))
    vendor: str = field(default="", metadata=bounds(0, 64))
    family: int = field(default=0, metadata=bounds(0, 1 << 32))
    model: int = field(default=0, metadata=bounds(0, 1 << 32))
    model_name: str = field(default="", metadata=bounds(0, 256))


@dataclass(frozen=True)
class StreamHeader:
    """The header fields kvmkit reads (check_host, inspect, the migration target);
    others a newer kvmkit may add are let through."""

    kind: str = field(default="", metadata=bounds(0, 64))
    kvmkit_version: str = field(default="", metadata=bounds(0, 64))
    created: str = field(default="", metadata=bounds(0, 64))
    kernel: str = field(default="", metadata=bounds(0, 256))
    kvm_backend: str = field(default="", metadata=bounds(0, 64))
    summary: str = field(default="", metadata=bounds(0, 1024))
    host_cpu: HostCpuRecord = field(default_factory=HostCpuRecord)
    requires: dict[str, int] = field(default_factory=dict, metadata=bounds(0, 256))

    def __post_init__(self) -> None:
        for name, value in self.requires.items():
            if not 0 <= value <= CAPABILITY_MAX:
                raise ValueError(f"field 'requires': {name} = {value} is out of range")


def check_header(header: dict[str, Any], label: str) -> StreamHeader:
    """The header's fields, typed; a wrong one is named."""
    return decode(StreamHeader, header, label, StreamFormatError, allow_unknown=True)
