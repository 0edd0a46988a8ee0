"""A bzImage's payload decompressed on the host: every format kvmkit reads gives back
the kernel's ELF, and nothing else is taken for one."""

import bz2
import gzip
import lzma

import pytest
import zstandard

from kvmkit.loader.payload import decompress

KERNEL = b"\x7fELF" + bytes(range(256)) * 64 + b"relocs"
SIZE = len(KERNEL).to_bytes(4, "little")  # the kernel's build appends it to every payload

PACKED = {
    "gzip": gzip.compress(KERNEL),
    "xz": lzma.compress(KERNEL, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32),
    "lzma": lzma.compress(KERNEL, format=lzma.FORMAT_ALONE),
    "bzip2": bz2.compress(KERNEL),
    "zstd": zstandard.ZstdCompressor().compress(KERNEL),
}


@pytest.mark.parametrize("fmt", sorted(PACKED))
def test_each_format_gives_back_the_kernel_with_the_size_trailer_ignored(fmt):
    data, why = decompress(PACKED[fmt] + SIZE, fmt, 1 << 20)
    assert (data, why) == (KERNEL, "")


def test_a_payload_larger_than_the_limit_is_left_to_the_guest():
    data, why = decompress(PACKED["xz"], "xz", len(KERNEL) - 1)
    assert data is None and "more than" in why


def test_formats_kvmkit_does_not_read_are_left_to_the_guest():
    assert decompress(b"\x02\x21\x4c\x18" + bytes(64), "lz4", 1 << 20) == (
        None,
        "kvmkit does not decompress lz4 payloads",
    )


def test_damaged_or_foreign_payloads_are_not_taken_for_a_kernel():
    data, why = decompress(PACKED["gzip"][:40], "gzip", 1 << 20)
    assert data is None or data != KERNEL
    data, why = decompress(PACKED["xz"][:10] + b"\xff" * 50, "xz", 1 << 20)
    assert data is None and "does not decompress" in why
    data, why = decompress(gzip.compress(b"MZ not an ELF"), "gzip", 1 << 20)
    assert data is None and "not an ELF" in why
