"""ELF64 x86-64 kernels (`vmlinux`): loadable segments, the entry point and the PVH entry.

Facts from the ELF-64 specification and include/xen/interface/elfnote.h: a vmlinux
is ET_EXEC for EM_X86_64; its PT_LOAD segments carry physical load addresses in
p_paddr and e_entry is the physical address of startup_64. A kernel built with
CONFIG_PVH has a PT_NOTE entry named "Xen" of type XEN_ELFNOTE_PHYS32_ENTRY (18)
whose descriptor (4 or 8 bytes, little endian) is the physical address of the 32-bit
PVH entry. Every offset and size is checked against the file before it is used.
"""

import struct
from dataclasses import dataclass

from kvmkit.errors import ConfigError
from kvmkit.loader.image_file import ImageFile

ELF_MAGIC = b"\x7fELF"
ELFCLASS64 = 2
ELFDATA2LSB = 1
ET_EXEC = 2
EM_X86_64 = 62
PT_LOAD = 1
PT_NOTE = 4
EHDR_SIZE = 64
PHDR_SIZE = 56
XEN_ELFNOTE_PHYS32_ENTRY = 18
XEN_NOTE_NAME = b"Xen"
MAX_NOTE_SEGMENT_BYTES = 1 << 20  # a vmlinux's notes take a few hundred bytes

MACHINE_NAMES = {
    2: "SPARC",
    3: "i386 (32-bit x86)",
    8: "MIPS",
    20: "PowerPC",
    21: "PowerPC64",
    22: "s390",
    40: "ARM",
    43: "SPARC64",
    62: "x86-64",
    183: "AArch64",
    243: "RISC-V",
    258: "LoongArch",
}


@dataclass(frozen=True)
class ElfSegment:
    """A PT_LOAD segment: `filesz` bytes from file `offset` go to `paddr`, then zeros up
    to `memsz`."""

    paddr: int
    offset: int
    filesz: int
    memsz: int

    @property
    def end(self) -> int:
        return self.paddr + self.memsz


@dataclass(frozen=True)
class ElfKernel:
    entry: int  # e_entry: physical address of startup_64
    segments: tuple[ElfSegment, ...]
    pvh_entry: int | None  # from the XEN_ELFNOTE_PHYS32_ENTRY note, if present

    @property
    def start(self) -> int:
        return min(s.paddr for s in self.segments)

    @property
    def end(self) -> int:
        return max(s.end for s in self.segments)

    def contains(self, gpa: int) -> bool:
        return any(s.paddr <= gpa < s.end for s in self.segments)


def is_elf(head: bytes) -> bool:
    return head[:4] == ELF_MAGIC


def _machine_name(machine: int) -> str:
    return MACHINE_NAMES.get(machine, f"machine {machine}")


def parse_elf(image: ImageFile) -> ElfKernel:
    """The loadable shape of an x86-64 vmlinux, or a ConfigError naming what is wrong."""
    ehdr = image.read_at("ELF header", 0, EHDR_SIZE)
    ei_class, ei_data = ehdr[4], ehdr[5]
    e_type, e_machine = struct.unpack_from("<HH", ehdr, 16)
    if ei_class != ELFCLASS64 or ei_data != ELFDATA2LSB:
        kind = {1: "32-bit", 2: "64-bit"}.get(ei_class, f"class {ei_class}")
        order = {1: "little-endian", 2: "big-endian"}.get(ei_data, f"data encoding {ei_data}")
        raise ConfigError(
            f"kernel {image.name} is a {kind} {order} ELF file for {_machine_name(e_machine)},"
            " not an x86-64 kernel; give a 64-bit x86 vmlinux or bzImage"
        )
    if e_machine != EM_X86_64:
        raise ConfigError(
            f"kernel {image.name} is built for {_machine_name(e_machine)}, not x86-64; give an"
            " x86-64 vmlinux or bzImage (ARCH=x86_64)"
        )
    if e_type != ET_EXEC:
        raise ConfigError(
            f"kernel {image.name} is an ELF file of type {e_type}, not an executable (a vmlinux"
            " is ET_EXEC): give the vmlinux from the top of the kernel build tree"
        )
    (e_entry, e_phoff) = struct.unpack_from("<QQ", ehdr, 24)
    e_phentsize, e_phnum = struct.unpack_from("<HH", ehdr, 54)
    if e_phnum == 0:
        raise ConfigError(
            f"kernel {image.name} has no program headers: give a linked vmlinux, not an object file"
        )
    if e_phentsize != PHDR_SIZE:
        raise ConfigError(
            f"kernel {image.name} has {e_phentsize}-byte program headers (ELF64 uses"
            f" {PHDR_SIZE}): the file is damaged; build the vmlinux again"
        )
    table = image.read_at("program header table", e_phoff, e_phnum * PHDR_SIZE)
    segments = []
    notes = []
    for i in range(e_phnum):
        p_type, _flags, p_offset, _vaddr, p_paddr, p_filesz, p_memsz, p_align = struct.unpack_from(
            "<IIQQQQQQ", table, i * PHDR_SIZE
        )
        if p_type == PT_LOAD:
            if p_filesz > p_memsz:
                raise ConfigError(
                    f"kernel {image.name}: segment {i} has more file bytes ({p_filesz:#x}) than"
                    f" memory bytes ({p_memsz:#x}); the file is damaged, build it again"
                )
            image.check_range(f"segment {i}", p_offset, p_filesz)
            if p_memsz:
                segments.append(ElfSegment(p_paddr, p_offset, p_filesz, p_memsz))
        elif p_type == PT_NOTE:
            image.check_range(f"note segment {i}", p_offset, p_filesz)
            if p_filesz > MAX_NOTE_SEGMENT_BYTES:
                raise ConfigError(
                    f"kernel {image.name}: note segment {i} is {p_filesz} bytes (a kernel's"
                    f" notes take well under {MAX_NOTE_SEGMENT_BYTES}); the file is damaged"
                )
            notes.append((i, p_offset, p_filesz, 8 if p_align == 8 else 4))
    if not segments:
        raise ConfigError(f"kernel {image.name} has no loadable segments: give a linked vmlinux")
    pvh_entry = None
    for i, offset, size, align in notes:
        data = image.read_at(f"note segment {i}", offset, size)
        found = find_pvh_entry(data, align, image.name)
        if found is not None:
            pvh_entry = found
    kernel = ElfKernel(e_entry, tuple(segments), pvh_entry)
    if not kernel.contains(e_entry):
        raise ConfigError(
            f"kernel {image.name}: entry point {e_entry:#x} is outside its loadable segments"
            f" ({kernel.start:#x}-{kernel.end:#x}); the file is damaged, build it again"
        )
    if pvh_entry is not None and not kernel.contains(pvh_entry):
        raise ConfigError(
            f"kernel {image.name}: PVH entry {pvh_entry:#x} is outside its loadable segments"
            f" ({kernel.start:#x}-{kernel.end:#x}); the file is damaged, build it again"
        )
    return kernel


def _align(n: int, to: int) -> int:
    return (n + to - 1) & ~(to - 1)


def find_pvh_entry(data: bytes, align: int, name: str) -> int | None:
    """The PVH entry address in one PT_NOTE segment's bytes, or None. Each step
    consumes at least 12 bytes, so the walk ends within len(data) / 12 steps."""
    pos = 0
    entry = None
    while pos + 12 <= len(data):
        namesz, descsz, n_type = struct.unpack_from("<III", data, pos)
        name_at = pos + 12
        desc_at = name_at + _align(namesz, align)
        next_at = desc_at + _align(descsz, align)
        if desc_at + descsz > len(data):
            raise ConfigError(
                f"kernel {name}: an ELF note at offset {pos:#x} of its note segment runs past"
                " the segment; the file is damaged, build it again"
            )
        if data[name_at : name_at + namesz].rstrip(b"\0") == XEN_NOTE_NAME and (
            n_type == XEN_ELFNOTE_PHYS32_ENTRY
        ):
            if descsz not in (4, 8):
                raise ConfigError(
                    f"kernel {name}: its Xen PHYS32_ENTRY note has a {descsz}-byte value"
                    " (expected 4 or 8); the file is damaged, build it again"
                )
            entry = int.from_bytes(data[desc_at : desc_at + descsz], "little")
        pos = next_at
    return entry
