"""A bzImage's compressed payload, decompressed by kvmkit on the host.

Facts from arch/x86/boot/compressed/Makefile and boot.rst: the payload
(payload_offset/payload_length in the setup header, from the start of the
protected-mode part) is `vmlinux.bin` (the kernel's ELF, stripped with `objcopy -S`:
its program headers and notes, PVH included, stay) followed by the relocation table,
compressed with the format the kernel was built with, and the uncompressed size
appended as 4 bytes.

The kernel's own decompressor runs at CPL0 in the guest, which a PVM host emulates at
about 1 us an instruction: minutes for gzip, tens of minutes for xz. Decompressed here
(well under a second) and entered as the vmlinux it holds, a bzImage boots as fast as
that vmlinux. Formats the standard library (or the optional zstandard package) cannot
read, lz4 and lzo, are left to the guest.

Nothing is decompressed past `limit` bytes (a payload that would grow larger is left
to the guest, which would not have had room for it either).
"""

import bz2
import lzma
import zlib
from collections.abc import Callable

ELF_MAGIC = b"\x7fELF"
PIECE = 1 << 20


def _zlib(data: bytes, limit: int) -> bytes:
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)  # a gzip stream
    return d.decompress(data, limit + 1)


def _xz(data: bytes, limit: int) -> bytes:
    return lzma.LZMADecompressor(lzma.FORMAT_XZ).decompress(data, limit + 1)


def _lzma(data: bytes, limit: int) -> bytes:
    return lzma.LZMADecompressor(lzma.FORMAT_ALONE).decompress(data, limit + 1)


def _bzip2(data: bytes, limit: int) -> bytes:
    return bz2.BZ2Decompressor().decompress(data, limit + 1)


def _zstd(data: bytes, limit: int) -> bytes:
    import io

    import zstandard  # optional: pip install 'kvmkit[zstd]'

    # zstd's reader takes the 4-byte size trailer for a second frame: leave it out
    reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data[:-4]))
    out = bytearray()
    try:
        while len(out) <= limit and (piece := reader.read(PIECE)):  # bounded pieces
            out += piece
    except zstandard.ZstdError as e:
        raise ValueError(str(e)) from None
    return bytes(out)


DECOMPRESSORS: dict[str, Callable[[bytes, int], bytes]] = {
    "gzip": _zlib,
    "xz": _xz,
    "lzma": _lzma,
    "bzip2": _bzip2,
    "zstd": _zstd,
}


def decompress(payload: bytes, fmt: str, limit: int) -> tuple[bytes | None, str]:
    """The ELF kernel inside `payload` (compressed as `fmt`), or None and why not."""
    run = DECOMPRESSORS.get(fmt)
    if run is None:
        return None, f"kvmkit does not decompress {fmt} payloads"
    try:
        data = run(payload, limit)
    except ImportError:
        return None, "the zstandard package is not installed (pip install 'kvmkit[zstd]')"
    except (OSError, EOFError, ValueError, lzma.LZMAError, zlib.error) as e:
        return None, f"the {fmt} payload does not decompress here ({e})"
    if len(data) > limit:
        return None, f"the payload decompresses to more than {limit >> 20} MiB"
    if not data.startswith(ELF_MAGIC):
        return None, "the decompressed payload is not an ELF kernel"
    return data, ""
