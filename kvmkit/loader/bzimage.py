"""bzImage kernels: the real-mode setup header and where the 64-bit entry is.

Facts from Documentation/arch/x86/boot.rst: the header starts at 0x1f1 with boot_flag
0xAA55 at 0x1fe and "HdrS" at 0x202; it ends at 0x202 plus the byte at 0x201. The
real-mode part is (setup_sects + 1) * 512 bytes (setup_sects 0 means 4); the rest of
the file, the protected-mode kernel, is loaded at pref_address and entered in 64-bit
mode at load address + 0x200 when xloadflags has XLF_KERNEL_64 (protocol >= 2.12).
The kernel then needs init_size bytes from its load address to decompress and start.
"""

import ctypes
import struct
from dataclasses import dataclass

from kvmkit.errors import ConfigError
from kvmkit.loader.boot_params import (
    BOOT_FLAG,
    HDRS_MAGIC,
    HEADER_ROOM_END,
    SETUP_HEADER_END,
    SETUP_HEADER_OFFSET,
    XLF_KERNEL_64,
    header_field_offset,
    setup_header,
)
from kvmkit.loader.image_file import ImageFile

MIN_PROTOCOL = 0x020C  # 2.12: xloadflags, XLF_KERNEL_64
ENTRY64_OFFSET = 0x200
DEFAULT_SETUP_SECTS = 4
SECTOR = 512
DEFAULT_LOAD_ADDRESS = 0x100000
KERNEL_VERSION_MAX = 256
HEADER_NEEDED_END = header_field_offset("init_size") + 4  # every field kvmkit reads

PAYLOAD_FORMATS = {
    b"\x1f\x8b": "gzip",
    b"\x1f\x9e": "gzip",
    b"BZ": "bzip2",
    b"\x5d\x00": "lzma",
    b"\xfd\x37": "xz",
    b"\x02\x21": "lz4",
    b"\x28\xb5": "zstd",
    b"\x7fE": "uncompressed",
}


@dataclass(frozen=True)
class BzImage:
    header: bytes  # file bytes [0x1f1, end of header): what goes into the zero page
    version: int  # boot protocol, (major << 8) | minor
    setup_size: int  # real-mode bytes at the start of the file
    kernel_size: int  # protected-mode bytes after them, loaded at load_address
    load_address: int
    init_size: int
    initrd_addr_max: int  # highest byte an initrd may occupy
    cmdline_size: int  # longest command line, without its NUL
    relocatable: bool
    kernel_alignment: int
    xloadflags: int
    payload_format: str
    kernel_version: str
    payload_at: int = 0  # file offset of the compressed payload
    payload_length: int = 0

    @property
    def entry64(self) -> int:
        return self.load_address + ENTRY64_OFFSET

    @property
    def end(self) -> int:
        """End of the memory the kernel needs from its load address while it starts."""
        return self.load_address + max(self.init_size, self.kernel_size)

    @property
    def protocol(self) -> str:
        return f"{self.version >> 8}.{self.version & 0xFF:02d}"


def is_bzimage(head: bytes) -> bool:
    return (
        len(head) >= 0x206
        and struct.unpack_from("<H", head, 0x1FE)[0] == BOOT_FLAG
        and struct.unpack_from("<I", head, 0x202)[0] == HDRS_MAGIC
    )


def parse_bzimage(image: ImageFile) -> BzImage:
    name = image.name
    head = image.read_at("setup header", 0, SETUP_HEADER_END)
    hdr = setup_header.from_buffer_copy(head, SETUP_HEADER_OFFSET)
    if hdr.version < MIN_PROTOCOL:
        raise ConfigError(
            f"kernel {name} speaks boot protocol {hdr.version >> 8}.{hdr.version & 0xFF:02d};"
            " kvmkit enters a bzImage through the 64-bit entry of protocol 2.12+ (Linux 3.8+):"
            " give a newer kernel or its vmlinux"
        )
    header_end = 0x202 + ctypes.c_int8(head[0x201]).value
    if head[0x200] != 0xEB or header_end < HEADER_NEEDED_END:
        raise ConfigError(
            f"kernel {name}: its setup header ends at {header_end:#x}, before the protocol"
            f" 2.12 fields kvmkit needs (up to {HEADER_NEEDED_END:#x}); the file is damaged"
        )
    if not hdr.xloadflags & XLF_KERNEL_64:
        raise ConfigError(
            f"kernel {name} has no 64-bit entry point (XLF_KERNEL_64 is clear: a 32-bit"
            " kernel?); give an x86-64 kernel (ARCH=x86_64)"
        )
    setup_size = ((hdr.setup_sects or DEFAULT_SETUP_SECTS) + 1) * SECTOR
    image.check_range("real-mode setup code", 0, setup_size + 1)
    kernel_size = image.size - setup_size
    if hdr.syssize * 16 > kernel_size + 15:
        raise image.truncated("protected-mode kernel (syssize)", setup_size, hdr.syssize * 16)
    if hdr.payload_offset + hdr.payload_length > kernel_size:
        raise image.truncated(
            "compressed payload", setup_size + hdr.payload_offset, hdr.payload_length
        )
    payload_format = "unknown"
    if hdr.payload_length >= 2:
        magic = image.read_at("payload", setup_size + hdr.payload_offset, 2)
        payload_format = PAYLOAD_FORMATS.get(magic, f"unknown ({magic.hex()})")
    load_address = hdr.pref_address or DEFAULT_LOAD_ADDRESS
    if load_address < DEFAULT_LOAD_ADDRESS:
        raise ConfigError(
            f"kernel {name} asks to be loaded at {load_address:#x}, below 1 MiB; a bzImage"
            " loads at 1 MiB or above: the file is damaged"
        )
    header_bytes = image.read_at(
        "setup header", SETUP_HEADER_OFFSET, min(header_end, HEADER_ROOM_END) - SETUP_HEADER_OFFSET
    )
    return BzImage(
        header=header_bytes,
        version=hdr.version,
        setup_size=setup_size,
        kernel_size=kernel_size,
        load_address=load_address,
        init_size=hdr.init_size,
        initrd_addr_max=hdr.initrd_addr_max,
        cmdline_size=hdr.cmdline_size,
        relocatable=bool(hdr.relocatable_kernel),
        kernel_alignment=hdr.kernel_alignment,
        xloadflags=hdr.xloadflags,
        payload_format=payload_format,
        kernel_version=_kernel_version(image, hdr.kernel_version, setup_size),
        payload_at=setup_size + hdr.payload_offset,
        payload_length=hdr.payload_length,
    )


def _kernel_version(image: ImageFile, pointer: int, setup_size: int) -> str:
    """The version string the header points to (at pointer + 0x200), or ""."""
    offset = pointer + 0x200
    if not pointer or offset >= setup_size:
        return ""
    raw = image.read_at("version string", offset, min(KERNEL_VERSION_MAX, setup_size - offset))
    text = raw.split(b"\0", 1)[0].decode("ascii", "replace")
    return "".join(c if c.isprintable() else "?" for c in text)
