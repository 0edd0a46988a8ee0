"""Small synthetic kernel images for the loader tests: an ELF64 vmlinux and a bzImage
built from the layouts in the ELF spec and Documentation/arch/x86/boot.rst (offsets
written out here, independently of kvmkit.loader), and a sparse fake guest RAM."""

import struct
from dataclasses import dataclass, field

from kvmkit.memory.layout import ram_regions

MIB = 1 << 20
KERNEL_PADDR = 0x100000


def elf_note(name: bytes, n_type: int, desc: bytes, align: int = 4) -> bytes:
    def pad(b: bytes) -> bytes:
        return b + bytes(-len(b) % align)

    return struct.pack("<III", len(name), len(desc), n_type) + pad(name) + pad(desc)


def pvh_note(entry: int, size: int = 8) -> bytes:
    return elf_note(b"Xen\0", 18, entry.to_bytes(size, "little"))


@dataclass
class Segment:
    paddr: int
    data: bytes
    memsz: int | None = None


def make_elf(
    segments: list[Segment] | None = None,
    entry: int | None = None,
    notes: bytes | None = None,
    pvh_entry: int | None = None,
    ei_class: int = 2,
    ei_data: int = 1,
    e_type: int = 2,
    machine: int = 62,
    phentsize: int = 56,
) -> bytes:
    """An ELF64 executable: PT_LOAD for each segment, one PT_NOTE if there are notes."""
    if segments is None:
        segments = [Segment(KERNEL_PADDR, b"\x90" * 0x3000, 0x5000)]
    if notes is None and pvh_entry is not None:
        notes = pvh_note(pvh_entry)
    if entry is None:
        entry = segments[0].paddr if segments else KERNEL_PADDR
    phdrs = len(segments) + (1 if notes else 0)
    offset = 64 + phdrs * 56
    table = b""
    blobs = b""
    if notes:
        table += struct.pack("<IIQQQQQQ", 4, 4, offset, 0, 0, len(notes), len(notes), 4)
        blobs += notes
        offset += len(notes)
    for seg in segments:
        pad = -offset % 16
        blobs += bytes(pad)
        offset += pad
        memsz = seg.memsz if seg.memsz is not None else len(seg.data)
        table += struct.pack(
            "<IIQQQQQQ",
            1,
            5,
            offset,
            seg.paddr | 0xFFFFFFFF80000000,
            seg.paddr,
            len(seg.data),
            memsz,
            16,
        )
        blobs += seg.data
        offset += len(seg.data)
    ident = b"\x7fELF" + bytes([ei_class, ei_data, 1]) + bytes(9)
    ehdr = ident + struct.pack(
        "<HHIQQQIHHHHHH", e_type, machine, 1, entry, 64, 0, 0, 64, phentsize, phdrs, 0, 0, 0
    )
    assert len(ehdr) == 64
    return ehdr + table + blobs


# setup header offsets from boot.rst (absolute file offsets)
HDR = {
    "setup_sects": (0x1F1, "B"),
    "syssize": (0x1F4, "I"),
    "boot_flag": (0x1FE, "H"),
    "jump": (0x200, "H"),
    "header": (0x202, "I"),
    "version": (0x206, "H"),
    "kernel_version": (0x20E, "H"),
    "type_of_loader": (0x210, "B"),
    "loadflags": (0x211, "B"),
    "ramdisk_image": (0x218, "I"),
    "ramdisk_size": (0x21C, "I"),
    "heap_end_ptr": (0x224, "H"),
    "cmd_line_ptr": (0x228, "I"),
    "initrd_addr_max": (0x22C, "I"),
    "kernel_alignment": (0x230, "I"),
    "relocatable_kernel": (0x234, "B"),
    "xloadflags": (0x236, "H"),
    "cmdline_size": (0x238, "I"),
    "payload_offset": (0x248, "I"),
    "payload_length": (0x24C, "I"),
    "pref_address": (0x258, "Q"),
    "init_size": (0x260, "I"),
    "kernel_info_offset": (0x268, "I"),
}


def hdr_get(buf: bytes, name: str) -> int:
    off, fmt = HDR[name]
    return struct.unpack_from("<" + fmt, buf, off)[0]


def make_bzimage(
    kernel: bytes | None = None,
    setup_sects: int = 4,
    version: int = 0x020F,
    xloadflags: int = 0x3,  # XLF_KERNEL_64 | XLF_CAN_BE_LOADED_ABOVE_4G
    pref_address: int = 0x100000,
    init_size: int = 0x200000,
    initrd_addr_max: int = 0x7FFFFFFF,
    cmdline_size: int = 2047,
    header_end: int = 0x26C,
    kernel_version: str = "6.99.0-test (kvmkit) #1",
    loadflags: int = 0x01 | 0x40 | 0x20,  # LOADED_HIGH, KEEP_SEGMENTS, QUIET: the loader clears
    payload: bytes = b"\x02\x21\x4c\x18" + b"z" * 60,
    syssize: int | None = None,
) -> bytes:
    if kernel is None:
        kernel = b"\x90" * 0x300 + payload + b"\xcc" * 0x100
    real = bytearray(((setup_sects or 4) + 1) * 512)
    version_at = 0x400

    def put(name: str, value: int) -> None:
        off, fmt = HDR[name]
        struct.pack_into("<" + fmt, real, off, value)

    put("setup_sects", setup_sects)
    put("syssize", syssize if syssize is not None else (len(kernel) + 15) // 16)
    put("boot_flag", 0xAA55)
    put("jump", 0xEB | ((header_end - 0x202) & 0xFF) << 8)
    put("header", 0x53726448)
    put("version", version)
    put("kernel_version", version_at - 0x200)
    put("loadflags", loadflags)
    put("initrd_addr_max", initrd_addr_max)
    put("kernel_alignment", 0x200000)
    put("relocatable_kernel", 1)
    put("xloadflags", xloadflags)
    put("cmdline_size", cmdline_size)
    put("payload_offset", 0x300)
    put("payload_length", len(payload))
    put("pref_address", pref_address)
    put("init_size", init_size)
    real[version_at : version_at + len(kernel_version) + 1] = kernel_version.encode() + b"\0"
    return bytes(real) + kernel


@dataclass
class FakeRam:
    """Guest RAM for pure-logic tests: kvmkit's layout, writes kept sparsely."""

    size_bytes: int
    writes: list[tuple[int, bytes]] = field(default_factory=list)
    written_bytes: int = 0
    keep: bool = True

    def __post_init__(self) -> None:
        self.regions = ram_regions(self.size_bytes)

    def write(self, gpa: int, data: bytes | memoryview) -> None:
        n = len(data)
        assert any(r.gpa <= gpa and gpa + n <= r.end for r in self.regions), hex(gpa)
        self.written_bytes += n
        if self.keep:
            self.writes.append((gpa, bytes(data)))

    def read(self, gpa: int, n: int) -> bytes:
        out = bytearray(n)
        for at, data in self.writes:
            lo, hi = max(at, gpa), min(at + len(data), gpa + n)
            if lo < hi:
                out[lo - gpa : hi - gpa] = data[lo - at : hi - at]
        return bytes(out)

    def u(self, gpa: int, fmt: str) -> int:
        return struct.unpack("<" + fmt, self.read(gpa, struct.calcsize("<" + fmt)))[0]
