"""Guest pages on the migration stream: data and zero runs round-trip into guest RAM,
read straight into place; damage and records outside guest RAM are refused."""

import io

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmkit.migration.pages import receive_pages, send_pages
from kvmkit.snapshot.format import PAGES, StreamFormatError, StreamReader, StreamWriter

PAGE_SIZE = 4096


class Ram:
    """Guest RAM as the page code sees it: a file of `size_bytes` with views into it."""

    def __init__(self, size_bytes: int, fill: bytes = b"") -> None:
        self.size_bytes = size_bytes
        self.data = bytearray(size_bytes)
        self.data[: len(fill)] = fill

    def file_view(self, offset: int, length: int) -> memoryview:
        return memoryview(self.data)[offset : offset + length]

    def zero_file_range(self, offset: int, length: int) -> None:
        self.data[offset : offset + length] = bytes(length)


def stream_of(ram: Ram, runs, live: bool = False) -> bytes:
    out = io.BytesIO()
    writer = StreamWriter(out)
    writer.write_header({"kind": "migration"})
    send_pages(writer, ram, runs, live=live)  # type: ignore[arg-type]
    writer.end()
    return out.getvalue()


def receive_all(data: bytes, ram: Ram) -> int:
    reader = StreamReader(io.BytesIO(data), "the migration stream")
    reader.read_header()
    pages = 0
    while True:
        head = reader.next_section()
        if head.tag != PAGES:
            reader.read_payload(head)
            return pages
        pages += receive_pages(reader.open_payload(head), ram).pages  # type: ignore[arg-type]


@st.composite
def guest_ram(draw):
    npages = draw(st.integers(1, 40))
    kinds = draw(st.lists(st.sampled_from("dz"), min_size=npages, max_size=npages))
    data = bytearray()
    for i, kind in enumerate(kinds):
        page = bytearray(PAGE_SIZE)
        if kind == "d":
            page[draw(st.integers(0, PAGE_SIZE - 1))] = 1 + i % 255
        data += page
    return bytes(data)


@settings(max_examples=60)
@given(guest_ram(), st.booleans())
def test_pages_round_trip_with_zero_pages_as_markers(content, live):
    source = Ram(len(content) + 8 * PAGE_SIZE, content)
    runs = [(0, len(content))]
    data = stream_of(source, runs, live)
    target = Ram(source.size_bytes, b"\xee" * source.size_bytes)  # stale bytes everywhere
    assert receive_all(data, target) == len(content) // PAGE_SIZE
    assert target.data[: len(content)] == content
    assert target.data[len(content) :] == b"\xee" * (8 * PAGE_SIZE)  # outside the runs
    zero_pages = sum(
        content[p : p + PAGE_SIZE] == bytes(PAGE_SIZE) for p in range(0, len(content), PAGE_SIZE)
    )
    assert len(data) < len(content) - zero_pages * PAGE_SIZE + 4096  # zeros cost a record


def test_big_runs_are_split_into_sections_and_land_in_place():
    content = bytes(range(256)) * (9 << 12)  # 9 MiB: three sections of at most 4 MiB
    source = Ram(16 << 20, content)
    target = Ram(16 << 20)
    receive_all(stream_of(source, [(0, 3 << 20), (5 << 20, 4 << 20)]), target)
    assert target.data[: 3 << 20] == content[: 3 << 20]
    assert target.data[3 << 20 : 5 << 20] == bytes(2 << 20)
    assert target.data[5 << 20 : 9 << 20] == content[5 << 20 : 9 << 20]


def test_a_flipped_bit_in_the_data_is_refused():
    source = Ram(64 * PAGE_SIZE, bytes(range(256)) * 64)
    data = bytearray(stream_of(source, [(0, 16 * PAGE_SIZE)]))
    data[len(data) // 2] ^= 0x10
    with pytest.raises(StreamFormatError, match="checksum mismatch"):
        receive_all(bytes(data), Ram(64 * PAGE_SIZE))


def test_a_record_outside_guest_ram_is_refused_before_any_write():
    source = Ram(64 * PAGE_SIZE, b"\x01" * (64 * PAGE_SIZE))
    data = stream_of(source, [(32 * PAGE_SIZE, 8 * PAGE_SIZE)])
    smaller = Ram(16 * PAGE_SIZE)
    with pytest.raises(StreamFormatError, match="outside guest RAM"):
        receive_all(data, smaller)
    assert smaller.data == bytes(16 * PAGE_SIZE)


def test_a_truncated_section_is_refused():
    source = Ram(64 * PAGE_SIZE, b"\x02" * (64 * PAGE_SIZE))
    data = stream_of(source, [(0, 32 * PAGE_SIZE)])
    with pytest.raises(StreamFormatError, match="truncated"):
        receive_all(data[: len(data) // 2], Ram(64 * PAGE_SIZE))
