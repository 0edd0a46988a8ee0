"""Guest pages on the migration stream: data and zero runs round-trip into guest RAM,
read straight into place; damage and records outside guest RAM are refused."""

import io
import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmkit.migration.pages import receive_pages, send_pages
from kvmkit.snapshot.format import PAGES, StreamFormatError, StreamReader, StreamWriter
from tests.adversarial.crafting import Stream

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


# -- what a page section and an iteration marker may say ---------------------------------------
def test_a_section_holds_at_most_max_records(monkeypatch):
    from kvmkit.migration import pages

    monkeypatch.setattr(pages, "MAX_RECORDS", 8)
    content = b"".join(
        (bytes([1 + i % 200]) * PAGE_SIZE) if i % 2 else bytes(PAGE_SIZE) for i in range(40)
    )
    source = Ram(len(content), content)
    data = stream_of(source, [(0, len(content))])
    target = Ram(len(content), b"\xee" * len(content))
    assert receive_all(data, target) == 40
    assert target.data == content
    counts = []
    at = data.index(b"PAGE")
    while at >= 0:
        counts.append(struct.unpack_from("<I", data, at + 28)[0])
        at = data.find(b"PAGE", at + 1)
    assert len(counts) == 5 and max(counts) == 8, counts


def _page_stream(payload: bytes) -> bytes:
    return Stream({"kind": "migration"}).add(PAGES, payload).end()


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (struct.pack("<I", 1 << 20), "1048576 records do not fit its payload"),
        (b"\x01\x00", "2 bytes, too short for a page section"),
        (struct.pack("<IQII", 1, 0, 0, 0), r"record 0 \(0x0, 0 pages, kind 0\) is outside"),
        (struct.pack("<IQII", 1, 4096, 1, 7), "kind 7.* is outside guest RAM or malformed"),
        (struct.pack("<IQII", 1, 1, 1, 0) + bytes(4096), "record 0 .* is outside"),
        (struct.pack("<IQII", 1, 0, 2, 0) + bytes(4096), "describe 8192 bytes of page data, but"),
        (struct.pack("<IQII", 1, 0, 1, 1) + bytes(10), "describe 0 bytes of page data, but 10"),
    ],
)
def test_malformed_page_records_are_refused_before_any_write(payload, message):
    ram = Ram(16 * PAGE_SIZE, b"\x07" * (16 * PAGE_SIZE))
    with pytest.raises(StreamFormatError, match=message):
        receive_all(_page_stream(payload), ram)
    assert ram.data == b"\x07" * (16 * PAGE_SIZE)


@pytest.mark.parametrize(
    ("info", "message"),
    [
        ([1], "iteration: must be an object, not an array"),
        ({"iteration": "3"}, "field 'iteration': must be a whole number, not a string"),
        ({"iteration": -1}, "field 'iteration': -1 is out of range"),
        ({"bytes": 1 << 40}, "field 'bytes': 1099511627776 is more than the machine's 65536"),
        ({"sync": 1}, "field 'sync': must be true or false, not an integer"),
        ({"phase": 5}, "field 'phase': must be one of 'precopy', 'state', not 5"),
        ({"phase": "go"}, "field 'phase': must be one of 'precopy', 'state', not 'go'"),
        ({"runs": {"a": 1}}, "field 'runs': must be an array, not an object"),
        ({"runs": [[0, 4096]] * 4097}, "field 'runs': 4097 items is out of range"),
        ({"runs": [[0]]}, "field 'runs'\\[0\\]: must have 2 items, not 1"),
        ({"runs": [[0, 4096], [4096, "x"]]}, "field 'runs'\\[1\\]\\[1\\]: must be a whole number"),
        ({"runs": [[65536, 1]]}, "field 'runs'\\[0\\]: \\[65536, 1\\] is not within"),
        ({"runs": [[0, 0]]}, "field 'runs'\\[0\\]: \\[0, 0\\] is not within"),
    ],
)
def test_mistyped_iteration_markers_are_refused_by_field(info, message):
    from kvmkit.migration.pages import iteration_info

    with pytest.raises(StreamFormatError, match=message):
        iteration_info(memoryview(json.dumps(info).encode()), 16 * PAGE_SIZE, "iteration")


def test_iteration_markers_as_the_source_writes_them():
    from kvmkit.migration.pages import iteration_info

    info = iteration_info(
        memoryview(b'{"iteration": 2, "bytes": 8192, "runs": [[0, 4096], [8192, 4096]]}'),
        16 * PAGE_SIZE,
        "iteration",
    )
    assert (info.iteration, info.bytes, info.runs) == (2, 8192, [(0, 4096), (8192, 4096)])
    assert iteration_info(memoryview(b'{"sync": true}'), PAGE_SIZE, "i").sync
    assert iteration_info(memoryview(b'{"phase": "state"}'), PAGE_SIZE, "i").phase == "state"
