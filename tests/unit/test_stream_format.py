"""The state stream format: round trips, and every kind of damage refused by name."""

import io
import struct
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmkit.snapshot.format import (
    DEVICES,
    MACHINE,
    MEMORY,
    VCPU,
    StreamFormatError,
    StreamReader,
    StreamWriter,
    pack_items,
    unpack_items,
    zstd_available,
)
from kvmkit.snapshot.memory_image import CHUNK_BYTES, Extent, chunked, unpack_index


def make_stream(payloads: list[tuple[bytes, bytes]], level: int | None = None) -> bytes:
    out = io.BytesIO()
    w = StreamWriter(out, level)
    w.write_header({"kind": "test", "n": len(payloads)})
    for tag, payload in payloads:
        w.write_section(tag, [payload], compress=level is not None)
    w.end()
    return out.getvalue()


def read_all(data: bytes) -> list[tuple[bytes, bytes]]:
    r = StreamReader(io.BytesIO(data), "the stream")
    r.read_header()
    got = []
    while not r.ended:
        head = r.next_section()
        payload = bytes(r.read_payload(head))
        if not r.ended:
            got.append((head.tag, payload))
    return got


SECTIONS = [(MACHINE, b'{"vcpus": 1}'), (VCPU, b"\x01" * 300), (MEMORY, bytes(range(256)) * 4096)]


def test_round_trip_and_big_payload_uses_parallel_crc():
    data = make_stream(SECTIONS)
    assert read_all(data) == SECTIONS


@pytest.mark.skipif(not zstd_available(), reason="zstandard is not installed")
def test_zstd_round_trip_is_smaller():
    plain, packed = make_stream(SECTIONS), make_stream(SECTIONS, level=3)
    assert len(packed) < len(plain) // 10
    assert read_all(packed) == SECTIONS


def test_payload_read_straight_into_a_buffer():
    data = make_stream([(MEMORY, b"abcd" * 1024)])
    r = StreamReader(io.BytesIO(data))
    r.read_header()
    target = memoryview(bytearray(4096))
    r.read_payload(r.next_section(), into=target)
    assert bytes(target) == b"abcd" * 1024


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_any_flipped_bit_is_refused(data):
    stream = bytearray(make_stream(SECTIONS[:2]))
    pos = data.draw(st.integers(0, len(stream) - 1))
    stream[pos] ^= 1 << data.draw(st.integers(0, 7))
    with pytest.raises(StreamFormatError):
        read_all(bytes(stream))


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_any_truncation_is_refused_as_truncated(data):
    stream = make_stream(SECTIONS[:2])
    cut = data.draw(st.integers(0, len(stream) - 1))
    with pytest.raises(StreamFormatError, match="truncated"):
        read_all(stream[:cut])


def test_newer_version_named_only_when_the_header_is_intact():
    stream = bytearray(make_stream(SECTIONS[:1]))
    length = struct.unpack_from("<I", stream, 12)[0]
    struct.pack_into("<I", stream, 8, 7)
    body = bytes(stream[16 : 16 + length])
    struct.pack_into("<I", stream, 16 + length, zlib.crc32(body, zlib.crc32(stream[8:16])))
    with pytest.raises(StreamFormatError, match="format version 7, newer"):
        read_all(bytes(stream))


def test_missing_end_marker_is_truncation():
    full = make_stream(SECTIONS[:2])
    end_size = 28 + 12 + 4  # head + crc, payload, crc
    with pytest.raises(StreamFormatError, match="truncated"):
        read_all(full[:-end_size])


def test_section_order_is_part_of_the_check():
    out = io.BytesIO()
    w = StreamWriter(out)
    w.write_header({})
    w.write_section(DEVICES, [b"{}"])
    w.end()
    r = StreamReader(io.BytesIO(out.getvalue()), "snapshot x")
    r.read_header()
    head = r.next_section()
    assert head.tag == DEVICES and "section 0 (device state, at byte" in head.label


def test_items_round_trip_and_damage():
    items = {"regs": b"\x00" * 144, "msrs": b"\x01\x02", "empty": b""}
    assert unpack_items(pack_items(items), "x") == items
    with pytest.raises(StreamFormatError, match="runs past the payload"):
        unpack_items(pack_items(items)[:-1], "vCPU 0 section")


def test_chunks_never_cross_a_chunk_line():
    extents = [Extent(0, 4096), Extent(CHUNK_BYTES - 4096, 3 * CHUNK_BYTES)]
    chunks = chunked(extents)
    assert sum(c.length for c in chunks) == sum(e.length for e in extents)
    assert all(c.offset // CHUNK_BYTES == (c.end - 1) // CHUNK_BYTES for c in chunks)


def test_memory_index_outside_ram_is_refused():
    bad = struct.pack("<QQ", 1 << 30, 4096)
    with pytest.raises(StreamFormatError, match="outside guest RAM"):
        unpack_index(bad, 1 << 20, "memory index")
