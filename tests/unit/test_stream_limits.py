"""What a state stream may claim: every length bounded by its section type and, in a
file, by the bytes left; compressed data by its raw length; JSON by its depth; a
stream that ends early named as truncated (a file) or closed (a socket); checksum
helpers owned by their reader and stopped with it."""

import io
import re
import socket
import struct
import threading
import tracemalloc

import pytest

from kvmkit.snapshot import format as fmt
from kvmkit.snapshot.file import SnapshotFile
from kvmkit.snapshot.format import (
    END,
    END_BYTES,
    FLAG_ZSTD,
    MACHINE,
    MAX_ITEMS,
    MAX_JSON_DEPTH,
    MEMORY,
    PAGES,
    SECTION_LIMITS,
    VCPU,
    StreamFormatError,
    StreamReader,
    json_depth,
    pack_items,
    section_label,
    unpack_items,
    unpack_json,
    zstd_available,
)
from kvmkit.snapshot.memory_image import index_limit, unpack_index
from tests.adversarial.crafting import (
    HEADER,
    Stream,
    head,
    machine_description,
    prelude,
    section,
    snapshot_bytes,
    zstd_bomb,
)

MIB = 1 << 20


class CountingSource:
    """A BytesIO that counts the bytes asked of it."""

    def __init__(self, data: bytes) -> None:
        self.f = io.BytesIO(data)
        self.asked = 0

    def readinto(self, view: memoryview) -> int:
        self.asked += len(view)
        return self.f.readinto(view)


def reader_at_first_section(data: bytes, **kw) -> StreamReader:
    r = StreamReader(io.BytesIO(data), "the stream", **kw)
    r.read_header()
    return r


# -- lengths ------------------------------------------------------------------------
@pytest.mark.parametrize("tag", sorted(SECTION_LIMITS))
def test_a_section_longer_than_its_type_holds_is_refused_from_its_head(tag):
    data = prelude({}) + head(tag, SECTION_LIMITS[tag] + 1)
    source = CountingSource(data)
    r = StreamReader(source, "the stream")
    r.read_header()
    with pytest.raises(StreamFormatError) as e:
        r.next_section()
    assert f"section 0 ({section_label(tag)}, at byte" in str(e.value)
    assert "over its limit of" in str(e.value)
    assert source.asked == len(data)  # nothing after the head was asked for


def test_a_caller_limit_replaces_the_type_limit():
    payload = bytes(5 * MIB)
    data = Stream().add(MEMORY, payload).end()
    with pytest.raises(StreamFormatError, match=r"claims 5242880 bytes \(5.0 MiB\)"):
        reader_at_first_section(data).next_section()
    r = reader_at_first_section(data)
    assert len(r.read_payload(r.next_section(limit=8 * MIB))) == len(payload)


def test_a_file_section_claiming_more_than_is_left_is_truncated_at_once():
    data = prelude({}) + head(VCPU, 5000) + b"x" * 100
    r = reader_at_first_section(data, size=len(data))
    r.what = "snapshot f"
    with pytest.raises(StreamFormatError) as e:
        r.next_section()
    assert str(e.value) == (
        f"snapshot f is truncated: it ends at byte {len(data)}, inside section 0 (vCPU state,"
        f" at byte {len(prelude({}))}) ({5000 + 4 - 100} bytes missing)"
    )


def test_a_header_longer_than_the_file_is_truncated_at_once():
    data = prelude({"kind": "x" * 1000})[:200]
    r = StreamReader(io.BytesIO(data), "snapshot f", size=len(data))
    with pytest.raises(
        StreamFormatError, match="truncated: it ends at byte 200, inside the header"
    ):
        r.read_header()


def test_bytes_after_the_end_marker_are_refused_in_a_file():
    data = Stream().add(VCPU, b"abc").end() + b"junk"
    r = reader_at_first_section(data, size=len(data))
    r.read_payload(r.next_section())
    with pytest.raises(
        StreamFormatError,
        match="4 bytes after the end marker: the file was appended to or damaged",
    ):
        r.read_payload(r.next_section())
    r = reader_at_first_section(data)  # a socket: what follows is not the stream's
    r.read_payload(r.next_section())
    r.read_payload(r.next_section())
    assert r.ended


def test_an_end_marker_of_another_size_is_refused():
    data = Stream().add(END, bytes(END_BYTES + 4)).end()
    with pytest.raises(
        StreamFormatError,
        match=r"section 0 \(end marker, at byte \d+\): claims 16 bytes, over its limit of 12",
    ):
        reader_at_first_section(data).next_section()


# -- the start and the end of a stream ------------------------------------------------------
@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            b"hello\n",
            "is not a kvmkit snapshot: it starts with b'hello\\n', not the magic b'KVMKITST'",
        ),
        (b"QFI\xfb\x00\x00\x00\x03" + bytes(100), "is not a kvmkit snapshot: it starts with"),
        (b"", "is truncated: it ends at byte 0, inside the header"),
        (b"KVMKI", "is truncated: it ends at byte 5, inside the header"),
    ],
)
def test_the_magic_is_checked_first(tmp_path, data, message):
    path = tmp_path / "f.snap"
    path.write_bytes(data)
    with pytest.raises(StreamFormatError, match=re.escape(message)):
        SnapshotFile(path)


def test_a_socket_that_closes_mid_stream_is_named_as_closed_a_file_as_truncated():
    data = Stream().add(VCPU, b"x" * 1000).end()
    cut = len(prelude({"kind": "test"})) + 28 + 500
    a, b = socket.socketpair()
    a.sendall(data[:cut])
    a.close()
    with b:
        r = StreamReader(b.makefile("rb", buffering=0), "the migration stream", peer="the source")
        r.read_header()
        with pytest.raises(StreamFormatError) as e:
            r.read_payload(r.next_section())
    assert str(e.value).startswith(
        f"the migration stream: the source closed the connection at byte {cut}, inside section 0"
    )
    assert "truncated" not in str(e.value)
    with pytest.raises(StreamFormatError, match=f"is truncated: it ends at byte {cut}, inside"):
        r = reader_at_first_section(data[:cut])
        r.read_payload(r.next_section())


# -- compressed payloads ---------------------------------------------------------------------
zstd = pytest.importorskip("zstandard") if zstd_available() else None
needs_zstd = pytest.mark.skipif(not zstd_available(), reason="zstandard is not installed")


@needs_zstd
def test_a_frame_declaring_more_than_the_raw_length_is_refused_undecompressed():
    bomb = zstd_bomb(1 << 30)  # 1 GiB of zeros in ~32 KiB
    data = Stream().add(MEMORY, bomb, FLAG_ZSTD, raw=SECTION_LIMITS[MEMORY]).end()
    r = reader_at_first_section(data)
    tracemalloc.start()
    try:
        with pytest.raises(StreamFormatError, match="declares 1073741824 bytes .* refused without"):
            r.read_payload(r.next_section())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * MIB


@needs_zstd
def test_a_frame_without_a_size_stops_at_the_raw_length():
    z = zstd.ZstdCompressor().compressobj()
    bomb = z.compress(bytes(64 << 20)) + z.flush()  # no content size in the frame
    data = Stream().add(MEMORY, bomb, FLAG_ZSTD, raw=4096).end()
    r = reader_at_first_section(data)
    with pytest.raises(StreamFormatError, match="cannot decompress"):
        r.read_payload(r.next_section())


@needs_zstd
@pytest.mark.parametrize("level", [1, 19])
def test_compressed_chunks_of_any_level_still_read(level):
    chunk = bytes(range(256)) * (SECTION_LIMITS[MEMORY] // 256)
    data = Stream().add(MEMORY, zstd.ZstdCompressor(level).compress(chunk), FLAG_ZSTD, len(chunk))
    r = reader_at_first_section(data.end())
    assert bytes(r.read_payload(r.next_section())) == chunk


@needs_zstd
def test_a_compressed_payload_not_smaller_than_raw_is_refused():
    data = Stream().add(VCPU, b"x" * 100, FLAG_ZSTD, raw=50).end()
    with pytest.raises(StreamFormatError, match="a compressed payload of 100 bytes for 50"):
        reader_at_first_section(data).next_section()


# -- JSON and items ----------------------------------------------------------------------------
def test_deep_json_is_refused_before_parsing():
    with pytest.raises(StreamFormatError, match=f"deeper than the {MAX_JSON_DEPTH}"):
        unpack_json(b"[" * 100_000 + b"]" * 100_000, "device section")
    with pytest.raises(StreamFormatError, match="device section: JSON nested"):
        unpack_json(b'{"a":' * 50_000, "device section")  # never closed


def test_json_depth_ignores_brackets_in_strings():
    assert json_depth(b'["[[[[[[", {"a": "]]]"}]') == 2
    tricky = b'["\\"[[[[", "\\\\", [[]]]' + b" " + b'"' + b"[" * 40 + b'"'
    assert json_depth(tricky) == 3
    nested = b'{"a": ' * 40 + b"1" + b"}" * 40
    assert json_depth(nested) == 40


@pytest.mark.parametrize("text", [b"NaN", b"[Infinity]", b'{"a": -Infinity}', b"\xff\xfe"])
def test_json_that_is_not_json_is_refused(text):
    with pytest.raises(StreamFormatError, match="not valid JSON"):
        unpack_json(text, "machine section")


def test_items_are_named_once_in_utf8_and_few():
    good = pack_items({"regs": b"1"})
    with pytest.raises(StreamFormatError, match="item 'regs' appears twice"):
        unpack_items(good + good, "vCPU 0 section")
    bad_name = struct.pack("<HI", 2, 0) + b"\xff\xfe"
    with pytest.raises(StreamFormatError, match="item name at byte 6 is not UTF-8"):
        unpack_items(bad_name, "vCPU 0 section")
    many = b"".join(pack_items({f"i{n}": b""}) for n in range(MAX_ITEMS + 1))
    with pytest.raises(StreamFormatError, match=f"more than {MAX_ITEMS} items"):
        unpack_items(many, "VM section")


# -- the memory index ---------------------------------------------------------------------------
def test_the_memory_index_is_bounded_by_the_machine():
    assert index_limit(1 << 20) == 16 * 256
    entries = b"".join(struct.pack("<QQ", i * 4096, 4096) for i in range(257))
    with pytest.raises(StreamFormatError, match="257 chunks, more than guest RAM"):
        unpack_index(entries, 1 << 20, "memory index")
    with pytest.raises(StreamFormatError, match=r"memory chunk 1 \(0x0\+0x1000\) is out of order"):
        unpack_index(struct.pack("<QQQQ", 0, 4096, 0, 4096), 1 << 20, "memory index")
    with pytest.raises(StreamFormatError, match="chunk 0 .* is out of order or outside"):
        unpack_index(struct.pack("<QQ", 0, 0), 1 << 20, "memory index")


def test_a_memory_index_claiming_more_than_the_machine_has_pages_is_refused(tmp_path):
    data = bytearray(snapshot_bytes(memory_bytes=1 << 20))
    # Rewrite the index section's head to claim one entry more than 1 MiB has pages.
    at = data.index(head(MEMORY, 32))
    data[at : at + 28] = head(MEMORY, index_limit(1 << 20) + 16)
    path = tmp_path / "big-index.snap"
    path.write_bytes(data)
    with pytest.raises(StreamFormatError, match=r"section 4 \(memory, at byte \d+\): claims 4112"):
        SnapshotFile(path)


# -- mistyped content, named by field ----------------------------------------------------------
def _with(tmp_path, **kw) -> str:
    path = tmp_path / "typed.snap"
    path.write_bytes(snapshot_bytes(**kw))
    with pytest.raises(StreamFormatError) as e:
        SnapshotFile(path)
    return str(e.value)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("vcpus", "2", "machine section: field 'vcpus': must be a whole number, not a string"),
        ("vcpus", True, "field 'vcpus': must be a whole number, not a boolean"),
        ("vcpus", 5000, "field 'vcpus': 5000 is out of range (1..1024)"),
        ("memory_bytes", -4096, "field 'memory_bytes': -4096 is out of range"),
        ("memory_bytes", 1 << 60, "field 'memory_bytes': 1152921504606846976 is out of range"),
    ],
)
def test_machine_fields_the_reader_uses_are_typed(tmp_path, field, value, message):
    machine = machine_description()
    machine[field] = value
    assert message in _with(tmp_path, machine=machine)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"host_cpu": ["x86_64"]}, "header: field 'host_cpu': must be an object, not an array"),
        ({"host_cpu": {"arch": 7}}, "field 'host_cpu': field 'arch': must be a string, not a"),
        ({"host_cpu": {"family": "25"}}, "field 'family': must be a whole number, not a string"),
        ({"requires": {"XSAVE": "yes"}}, "field 'requires'['XSAVE']: must be a whole number"),
        ({"requires": {"XSAVE": -1}}, "field 'requires': XSAVE = -1 is out of range"),
        ({"requires": []}, "header: field 'requires': must be an object, not an array"),
        ({"kind": None}, "header: field 'kind': must be a string, not null"),
        ({"summary": {"a": 1}}, "header: field 'summary': must be a string, not an object"),
    ],
)
def test_header_fields_are_typed(tmp_path, change, message):
    assert message in _with(tmp_path, header={**HEADER, **change})


def test_a_header_that_is_not_an_object_is_refused(tmp_path):
    path = tmp_path / "list.snap"
    path.write_bytes(prelude(b"[1, 2]"))
    with pytest.raises(StreamFormatError, match="header: is not a JSON object"):
        SnapshotFile(path)


# -- one reader, one helper, stopped with it -------------------------------------------------------
def _crc_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("kvmkit-crc")]


def test_the_checksum_helper_belongs_to_the_reader_and_stops_with_it():
    from concurrent.futures import ThreadPoolExecutor

    assert not any(
        isinstance(v, fmt.Checksummer | ThreadPoolExecutor) for v in vars(fmt).values()
    ), "no module-level helper"
    before = _crc_threads()
    big = bytes(range(256)) * (3 * MIB // 256)
    data = Stream().add(PAGES, big).add(VCPU, b"x").end()
    with reader_at_first_section(data) as r:
        target = memoryview(bytearray(len(big)))
        payload = r.open_payload(r.next_section())
        payload.readinto(target)
        payload.finish()
        assert len(_crc_threads()) == len(before) + 1
        assert bytes(target) == big
    assert _crc_threads() == before


def test_a_damaged_payload_left_to_the_helper_is_named_by_the_next_section():
    big = bytearray(bytes(range(256)) * (2 * MIB // 256))
    data = bytearray(Stream().add(MEMORY, bytes(big)).add(VCPU, b"x").end())
    data[len(prelude({"kind": "test"})) + 28 + 1000] ^= 0x40
    with reader_at_first_section(bytes(data)) as r:
        first = r.next_section()
        payload = r.open_payload(first)
        payload.readinto(memoryview(big))
        payload.finish(wait=False)
        with pytest.raises(StreamFormatError, match=r"section 0 \(memory, .*checksum mismatch"):
            r.read_payload(r.next_section())


def test_the_writer_checksums_on_its_own_helper_and_stops_it():
    before = _crc_threads()
    data = Stream().add(MACHINE, b"{}").end()  # a reference for the layout
    out = io.BytesIO()
    w = fmt.StreamWriter(out)
    w.write_header({"kind": "test"})
    w.write_section(MACHINE, [b"{}"])
    w.end()
    assert out.getvalue() == data
    w = fmt.StreamWriter(io.BytesIO())
    w.write_section(MEMORY, [bytes(2 * MIB)])
    assert len(_crc_threads()) == len(before) + 1
    w.end()
    assert _crc_threads() == before


def test_a_section_within_its_limit_is_read_in_pieces_as_it_arrives():
    """A generous caller limit (a big machine's memory index) over a socket that sends
    a head claiming 4 GiB, 1 MiB of it, then closes: refused as closed, having held
    about what arrived."""
    a, b = socket.socketpair()
    claim = 4 << 30
    data = prelude({"kind": "test"}) + head(MEMORY, claim)

    def send() -> None:
        with a:
            a.sendall(data + bytes(MIB))

    sender = threading.Thread(target=send)
    sender.start()
    tracemalloc.start()
    try:
        with b, StreamReader(b.makefile("rb", buffering=0), "the stream", peer="the peer") as r:
            r.read_header()
            with pytest.raises(StreamFormatError, match="the peer closed the connection at"):
                r.read_payload(r.next_section(limit=claim))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        sender.join()
    assert peak < 8 * MIB, peak


def test_a_pread_section_has_the_same_limits_and_messages(tmp_path):
    data = snapshot_bytes()
    path = tmp_path / "p.snap"
    path.write_bytes(data[:-10])
    with SnapshotFile(path) as snap, open(path, "rb") as f:
        r = snap.reader
        chunk = fmt.SectionHead(7, MEMORY, 0, 8192, 8192, r.offset)
        assert len(r.pread_section(f.fileno(), chunk)) == 8192
        end = fmt.SectionHead(9, END, 0, END_BYTES, END_BYTES, len(data) - 44)
        with pytest.raises(StreamFormatError) as e:
            r.pread_section(f.fileno(), end)
        assert f"is truncated: it ends at byte {len(data) - 10}, inside section 9 (end" in str(
            e.value
        )
        huge = fmt.SectionHead(7, MEMORY, 0, 1 << 34, 1 << 34, r.offset)
        with pytest.raises(StreamFormatError, match="claims 17179869184 bytes"):
            r.pread_section(f.fileno(), huge)


def test_section_helper_sanity():
    assert section(VCPU, b"ab")[28:30] == b"ab"
