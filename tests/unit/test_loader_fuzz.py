"""Hostile kernel images: random, truncated and mutated files never raise anything but
ConfigError, and never cost memory out of proportion (a 64 KiB working set plus the
file's own headers, whatever sizes the headers claim)."""

import struct
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmkit.errors import ConfigError
from kvmkit.loader import load_linux
from kvmkit.loader.image_file import CHUNK_BYTES
from tests.unit.kernel_images import HDR, MIB, FakeRam, Segment, make_bzimage, make_elf, pvh_note

RAM = 64 * MIB
ELF = make_elf(
    [Segment(0x100000, b"\x90" * 0x2000, 0x4000), Segment(0x200000, b"\xcc" * 0x1000)],
    notes=pvh_note(0x100010),
)
BZIMAGE = make_bzimage()
# offsets of every field a loader trusts: ELF header and program headers, setup header
ELF_FIELDS = (
    [(o, 8) for o in (24, 32)]
    + [(o, 2) for o in (16, 18, 54, 56)]
    + [(64 + 56 * i + o, 8) for i in range(3) for o in (8, 24, 32, 40)]
)
BZ_FIELDS = [(off, struct.calcsize(fmt)) for off, fmt in HDR.values()]
FUZZ = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture(scope="module")
def kernel_path(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "kernel"


def load_within_bounds(path: Path, data: bytes, protocol: str = "auto") -> None:
    path.write_bytes(data)
    ram = FakeRam(RAM, keep=False)
    tracemalloc.start()
    try:
        plan = load_linux(ram, path, cmdline="console=ttyS0", protocol=protocol)
    except ConfigError as e:
        assert "\n" not in str(e) and str(e)
        assert ram.written_bytes == 0  # refused before writing
        return
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert peak < 2 * CHUNK_BYTES + (1 << 16), peak  # never the whole file
    start, end = plan.kernel_range
    assert 0x100000 <= start < end <= RAM
    assert ram.written_bytes <= RAM


@FUZZ
@given(st.binary(max_size=4096))
def test_random_bytes(kernel_path, data):
    load_within_bounds(kernel_path, data)


@FUZZ
@given(st.sampled_from([ELF, BZIMAGE]), st.data())
def test_truncated_images(kernel_path, image, data):
    cut = data.draw(st.integers(0, len(image)))
    load_within_bounds(kernel_path, image[:cut])


@FUZZ
@given(
    st.sampled_from([(ELF, ELF_FIELDS), (BZIMAGE, BZ_FIELDS)]),
    st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 2**64 - 1)), min_size=1, max_size=4),
    st.sampled_from(["auto", "pvh", "boot64"]),
)
def test_mutated_header_fields(kernel_path, image_fields, mutations, protocol):
    image, fields = image_fields
    raw = bytearray(image)
    for pick, value in mutations:
        offset, size = fields[pick % len(fields)]
        raw[offset : offset + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
    load_within_bounds(kernel_path, bytes(raw), protocol)


@FUZZ
@given(
    st.sampled_from([ELF, BZIMAGE]),
    st.lists(st.tuples(st.integers(0), st.integers(0, 255)), max_size=16),
)
def test_flipped_bytes(kernel_path, image, flips):
    raw = bytearray(image)
    for pos, value in flips:
        raw[pos % len(raw)] = value
    load_within_bounds(kernel_path, bytes(raw))


def test_a_large_kernel_is_copied_a_chunk_at_a_time(kernel_path):
    big = make_elf([Segment(0x100000, bytes(range(256)) * (24 * MIB // 256), 32 * MIB)])
    load_within_bounds(kernel_path, big)  # 24 MiB of file, read a chunk at a time
