"""Fuzz targets for every parser of the state stream, shared by the suite
(tests/adversarial/test_fuzz.py, briefly) and scripts/fuzz_stream.py (for longer).

Each target takes bytes and interprets them as a structured input (a prelude, heads
with made-up lengths, records, JSON of the fields kvmkit reads, a damaged snapshot
file), fixing checksums where it chooses so the parser is reached past them. A
target may raise only the typed errors in TYPED; anything else is a finding."""

import io
import json
import struct
import tempfile
from collections.abc import Callable
from contextlib import redirect_stdout
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from kvmkit.errors import ConfigError
from kvmkit.snapshot.file import inspect
from kvmkit.snapshot.format import (
    FLAG_ZSTD,
    MAGIC,
    PAGES,
    SECTION_LIMITS,
    SECTION_NAMES,
    StreamFormatError,
    StreamReader,
    check_header,
    unpack_items,
    unpack_json,
    zstd_available,
)
from kvmkit.snapshot.memory_image import unpack_index
from tests.adversarial.crafting import PAGE, Stream, head, prelude, snapshot_bytes

TYPED = (StreamFormatError, ConfigError)
TAGS = sorted(SECTION_NAMES)


class Draw:
    """Structured values drawn from fuzzer bytes (zeros once they run out)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.at = 0

    def left(self) -> int:
        return len(self.data) - self.at

    def take(self, n: int) -> bytes:
        out = self.data[self.at : self.at + max(0, n)]
        self.at += len(out)
        return out

    def uint(self, nbytes: int) -> int:
        return int.from_bytes(self.take(nbytes).ljust(nbytes, b"\0"), "little")

    def below(self, n: int) -> int:
        return self.uint(2) % n if n > 1 else 0

    def pick(self, options: list[Any] | tuple[Any, ...]) -> Any:
        return options[self.below(len(options))]

    def flag(self) -> bool:
        return bool(self.uint(1) & 1)

    def length(self, limit: int) -> int:
        """A length, most often plausible, sometimes at or past a limit or absurd."""
        kind = self.uint(1) % 8
        if kind < 4:
            return self.uint(2) % 4096
        return self.pick(
            [limit, limit + 1, limit - 1, 1 << 32, 1 << 34, (1 << 64) - 1, self.uint(8)]
        )


KEYS = (
    "kind", "host_cpu", "arch", "vendor", "family", "model", "requires", "XSAVE", "summary",
    "iteration", "bytes", "runs", "sync", "phase", "vcpus", "memory_bytes", "kernel",
    "created", "kvmkit_version", "kvm_backend", "model_name", "regions", "backend",
)  # fmt: skip
STRINGS = ("", "x86_64", "AuthenticAMD", "state", "precopy", "migration", "snapshot", "\udcff")


def json_value(d: Draw, depth: int = 0) -> Any:
    kind = d.below(9 if depth < 6 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return d.flag()
    if kind == 2:
        return d.pick([0, 1, -1, 4096, 1 << 20, 1 << 31, 1 << 40, 1 << 63, 1 << 64, -(1 << 70)])
    if kind == 3:
        return d.uint(8) - (1 << 63) * d.flag()
    if kind == 4:
        return d.pick([0.5, -1.0, 1e300, 4096.0])
    if kind == 5:
        return d.pick(STRINGS) if d.flag() else d.take(d.below(12)).decode(errors="replace")
    if kind == 6 or kind == 7:
        return [json_value(d, depth + 1) for _ in range(d.below(5))]
    return {d.pick(KEYS): json_value(d, depth + 1) for _ in range(d.below(6))}


def json_bytes(d: Draw) -> bytes:
    """JSON text of a drawn value, or raw bytes, or deep nesting."""
    mode = d.below(8)
    if mode == 0:
        return d.take(d.below(256))
    if mode == 1:
        n = d.uint(2) * 2
        return b"[" * n + b"]" * (n * d.uint(1) // 255)
    value = json_value(d)
    if mode == 2 or not isinstance(value, dict):
        value = {d.pick(KEYS): value for _ in range(1 + d.below(4))} | {"kind": "migration"}
    return json.dumps(value, ensure_ascii=False).encode(errors="surrogatepass")


def _reader(stream: bytes, d: Draw) -> StreamReader:
    mode = d.below(3)
    return StreamReader(
        io.BytesIO(stream),
        "the stream",
        size=len(stream) if mode == 0 else None,
        peer="the source" if mode == 1 else None,
    )


def read_everything(reader: StreamReader, d: Draw) -> None:
    """Every section, each read one of the ways a caller reads."""
    with reader:
        reader.read_header()
        while not reader.ended:
            head_ = reader.next_section()
            how = d.below(3)
            if how == 0 or head_.tag == b"END ":
                reader.read_payload(head_)
            elif how == 1:
                payload = reader.open_payload(head_)
                while payload.left:
                    payload.read(min(payload.left, 1 + d.uint(3)))
                payload.finish(wait=d.flag())
            else:
                reader.skip_payload(head_)


# -- the targets ------------------------------------------------------------------------------
def target_prelude(data: bytes) -> None:
    d = Draw(data)
    mode = d.below(3)
    if mode == 0:
        stream = d.take(d.left())
    elif mode == 1:
        stream = MAGIC + d.take(d.left())
    else:
        stream = prelude(json_bytes(d), version=d.pick([1, 0, 2, 1, 1]))
    read_everything(_reader(stream, d), d)


def target_section_heads(data: bytes) -> None:
    d = Draw(data)
    stream = Stream()
    for _ in range(d.below(6)):
        tag = d.pick(TAGS) if d.below(8) else d.take(4).ljust(4, b"?")
        limit = SECTION_LIMITS.get(tag, 1 << 20)
        flags = d.pick([0, 0, 0, FLAG_ZSTD, 2, 0x8000])
        payload = d.take(d.below(600))
        if flags == FLAG_ZSTD and zstd_available() and d.flag():
            import zstandard

            raw = payload * (1 + d.uint(1))
            packed = zstandard.ZstdCompressor().compress(raw)
            stream.add(tag, packed, flags, raw=len(raw) if d.flag() else d.length(limit))
        elif d.flag():
            stream.add(tag, payload, flags)
        else:  # a head claiming anything, then whatever bytes follow
            stored = d.length(limit)
            raw = stored if d.below(4) else d.length(limit)
            crc_ok = d.below(8) != 0
            h = head(tag, stored, raw, flags, reserved=d.pick([0, 0, 0, 1]))
            stream.add_bytes(h if crc_ok else h[:-1] + bytes([h[-1] ^ 1]))
            stream.add_bytes(payload, sections=0)
    out = stream.end() if d.below(4) else bytes(stream.data)
    read_everything(_reader(out, d), d)


def target_items(data: bytes) -> None:
    unpack_items(data, "vCPU 0 section")


def target_json(data: bytes) -> None:
    d = Draw(data)
    value = unpack_json(json_bytes(d), "device section")
    if isinstance(value, dict):
        check_header(value, "the header")


def target_memory_index(data: bytes) -> None:
    d = Draw(data)
    memory_bytes = d.pick([1 << 20, 4096, 1, 1 << 40, d.uint(6) + 1])
    if d.flag():
        payload = b"".join(
            struct.pack("<QQ", d.length(memory_bytes), d.length(4 << 20)) for _ in range(d.below(8))
        )
    else:
        payload = d.take(d.left())
    unpack_index(payload, memory_bytes, "memory index")


class Ram:
    """Guest RAM as the page code sees it: a bytearray with views into it."""

    def __init__(self, size_bytes: int) -> None:
        self.size_bytes = size_bytes
        self.data = bytearray(size_bytes)

    def file_view(self, offset: int, length: int) -> memoryview:
        return memoryview(self.data)[offset : offset + length]

    def zero_file_range(self, offset: int, length: int) -> None:
        self.data[offset : offset + length] = bytes(length)


def target_page_records(data: bytes) -> None:
    from kvmkit.migration.pages import receive_pages

    d = Draw(data)
    ram = Ram(64 * PAGE)
    stream = Stream({"kind": "migration"})
    for _ in range(1 + d.below(3)):
        count = d.pick([d.below(8), d.below(8), 1 << 16, (1 << 16) + 1, d.uint(4)])
        records = b""
        for _ in range(min(count, 16)):
            offset = d.pick([d.below(80) * PAGE, d.uint(8), PAGE + 1])
            pages = d.pick([1, 2, 0, d.uint(4), 64])
            records += struct.pack("<QII", offset, pages, d.pick([0, 1, 0, 1, 2, d.uint(4)]))
        body = d.take(d.below(4 * PAGE + 2))
        stream.add(PAGES, struct.pack("<I", count) + records + body)
    out = stream.end()
    with _reader(out, d) as reader:
        reader.read_header()
        while not reader.ended:
            h = reader.next_section()
            if h.tag == PAGES and not h.flags:
                receive_pages(reader.open_payload(h), ram)  # type: ignore[arg-type]
            else:
                reader.read_payload(h)


def target_iteration(data: bytes) -> None:
    from kvmkit.migration.pages import iteration_info

    d = Draw(data)
    payload = json_bytes(d)
    info = iteration_info(memoryview(payload), d.pick([1 << 20, 4096, 1 << 30]), "iteration")
    assert all(0 <= o and 0 < n for o, n in info.runs)


_SNAPSHOTS: dict[bool, bytes] = {}


def _base_snapshot(compressed: bool) -> bytes:
    if compressed not in _SNAPSHOTS:
        _SNAPSHOTS[compressed] = snapshot_bytes(vcpus=2, compress_level=3 if compressed else None)
    return _SNAPSHOTS[compressed]


def _sections(data: bytes) -> list[tuple[int, int]]:
    """(offset, stored) of each section of a stream whose heads are intact."""
    if len(data) < 16:
        return []
    (length,) = struct.unpack_from("<I", data, 12)
    at, out = 16 + length + 4, []
    while at + 28 <= len(data):
        stored = struct.unpack_from("<Q", data, at + 8)[0]
        out.append((at, stored))
        at += 28 + stored + 4
    return out


def mutate_snapshot(d: Draw) -> bytes:
    """A valid snapshot changed in ways a checksum check alone would not catch."""
    data = bytearray(_base_snapshot(d.flag() and zstd_available()))
    for _ in range(1 + d.below(3)):
        op = d.below(7)
        sections = _sections(bytes(data))
        if op == 0 and sections:  # a section's payload replaced, checksums made right
            at, stored = d.pick(sections)
            tag = bytes(data[at : at + 4])
            payload = json_bytes(d) if d.flag() else d.take(d.below(300))
            data[at : at + 28 + stored + 4] = (
                Stream().add(tag, payload).data[-(32 + len(payload)) :]
            )
        elif op == 1 and sections:  # a head's claims changed, its checksum made right
            at, stored = d.pick(sections)
            tag = bytes(data[at : at + 4]) if d.below(4) else d.pick(TAGS)
            new_stored = d.length(SECTION_LIMITS.get(tag, 1 << 20))
            raw = new_stored if d.flag() else d.length(SECTION_LIMITS.get(tag, 1 << 20))
            data[at : at + 28] = head(tag, new_stored, raw, d.pick([0, 0, FLAG_ZSTD]))
        elif op == 2 and data:  # a byte changed, checksums left alone
            data[d.below(len(data))] ^= 1 + d.uint(1) % 255
        elif op == 3:  # truncated
            del data[d.below(len(data) + 1) :]
        elif op == 4:  # appended to
            data += d.take(d.below(64))
        elif op == 5 and len(data) >= 16:  # a new header, checksum made right
            (length,) = struct.unpack_from("<I", data, 12)
            data[: 16 + length + 4] = prelude(json_bytes(d), version=d.pick([1, 1, 1, 2, 0]))
        elif op == 6 and sections:  # a whole section dropped or duplicated
            at, stored = d.pick(sections)
            piece = bytes(data[at : at + 28 + stored + 4])
            if d.flag():
                del data[at : at + len(piece)]
            else:
                data[at:at] = piece
    return bytes(data)


_TMP = tempfile.TemporaryDirectory(prefix="kvmkit-fuzz-")


def target_snapshot_file(data: bytes) -> None:
    """The whole-file read path: SnapshotFile, inspect, and the inspect command's
    rendering of what it read."""
    from kvmkit.cli_snapshot import cmd_snapshot

    d = Draw(data)
    path = Path(_TMP.name) / "fuzz.snap"
    path.write_bytes(mutate_snapshot(d))
    info = inspect(path)
    assert isinstance(info["header"], dict)
    args = SimpleNamespace(action="inspect", file=str(path), json=d.flag())
    with redirect_stdout(io.StringIO()):
        cmd_snapshot(args, lambda *a: 0)  # type: ignore[arg-type]


TARGETS: dict[str, Callable[[bytes], None]] = {
    "prelude": target_prelude,
    "section_heads": target_section_heads,
    "items": target_items,
    "json": target_json,
    "memory_index": target_memory_index,
    "page_records": target_page_records,
    "iteration": target_iteration,
    "snapshot_file": target_snapshot_file,
}


def run_one(target: Callable[[bytes], None], data: bytes) -> BaseException | None:
    """Run a target; return an untyped exception (a finding), None otherwise."""
    try:
        target(data)
    except TYPED:
        return None
    except Exception as e:  # noqa: BLE001 (what the fuzzer looks for)
        return e
    return None
