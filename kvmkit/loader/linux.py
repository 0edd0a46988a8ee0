"""Load a Linux kernel (vmlinux or bzImage), its initrd and command line into guest RAM.

`load_linux` checks everything first (image format, architecture, truncation, sizes,
command line, where the initrd fits) and only then writes guest RAM: the kernel, the
initrd, the command line and the boot information for the chosen entry (PVH
hvm_start_info, or the zero page of the 64-bit boot protocol). Files are read a chunk
at a time; nothing here touches KVM. The returned plan says how to enter the kernel;
`kvmkit.arch.x86.linux_entry` turns it into vCPU registers and the GDT/page tables to
write. Fixed addresses are in `kvmkit.loader.addresses`.
"""

import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

from kvmkit.errors import ConfigError
from kvmkit.loader import payload
from kvmkit.loader.addresses import (
    BOOT_AREA,
    BOOT_GDT_GPA,
    BOOT_PAGE_TABLES_GPA,
    BOOT_STACK_TOP,
    CMDLINE_AREA_BYTES,
    CMDLINE_GPA,
    HIGH_MEMORY_START,
    LOW_RAM_LIMIT,
    PVH_MEMMAP_GPA,
    PVH_MODLIST_GPA,
    PVH_START_INFO_GPA,
    ZERO_PAGE_GPA,
)
from kvmkit.loader.boot_params import (
    COMMAND_LINE_SIZE,
    build_zero_page,
    synthetic_setup_header,
)
from kvmkit.loader.bzimage import BzImage, is_bzimage, parse_bzimage
from kvmkit.loader.e820 import E820Entry, build_e820, check_ranges, merge_ranges
from kvmkit.loader.elf import ElfKernel, ElfSegment, is_elf, parse_elf
from kvmkit.loader.image_file import ImageFile, zero_fill
from kvmkit.loader.pvh import build_memmap, build_modlist, build_start_info
from kvmkit.memory.layout import MIB, MMIO_GAP_START, approx_size, page_align_down, page_align_up

PROTOCOLS = ("auto", "pvh", "boot64")
KERNEL_EXPECT = "an x86-64 vmlinux or bzImage"
INITRD_EXPECT = "an initramfs (cpio) or initrd image"
VMLINUX_INITRD_ADDR_MAX = 0x37FFFFFF  # boot.rst's limit when the kernel states none


class RamRegionLike(Protocol):
    @property
    def gpa(self) -> int: ...
    @property
    def size(self) -> int: ...
    @property
    def end(self) -> int: ...


class GuestRam(Protocol):
    """What the loader needs of guest memory; kvmkit.memory.GuestMemory satisfies it."""

    size_bytes: int

    @property
    def regions(self) -> Sequence[RamRegionLike]: ...

    def write(self, gpa: int, data: bytes | memoryview) -> None: ...


@dataclass(frozen=True)
class KernelImage:
    """A parsed kernel, whichever format it came in: file pieces to copy and where."""

    kind: str  # "vmlinux" | "bzImage"
    pieces: tuple[ElfSegment, ...]  # file bytes to copy (then zeros up to memsz)
    start: int  # lowest guest address the kernel occupies
    end: int  # end of what it occupies while it starts (bzImage: load + init_size)
    boot64_entry: int
    pvh_entry: int | None
    header: bytes  # setup header bytes for the zero page
    cmdline_max: int  # longest command line it takes, NUL not counted
    cmdline_limit_source: str
    initrd_limit: int  # first address an initrd may not occupy
    notes: tuple[str, ...] = ()
    payload: tuple[int, int, str] | None = None  # bzImage: file offset, length, format


@dataclass(frozen=True)
class LinuxBootPlan:
    """Where everything went and how to enter the kernel. Ranges are [start, end);
    e820 entries are (addr, size, type)."""

    protocol: str  # "pvh" | "boot64"
    image_kind: str  # "vmlinux" | "bzImage"
    entry: int  # guest-physical entry address
    boot_info_gpa: int  # hvm_start_info (pvh: EBX) or the zero page (boot64: RSI)
    kernel_range: tuple[int, int]
    initrd_range: tuple[int, int] | None
    cmdline_gpa: int
    e820: list[E820Entry]
    notes: list[str] = field(default_factory=list)
    gdt_gpa: int = BOOT_GDT_GPA  # where the entry's GDT goes
    page_tables_gpa: int | None = None  # boot64: identity page tables (CR3)
    stack_top: int | None = None  # boot64: initial RSP


def describe_vmlinux(elf: ElfKernel) -> KernelImage:
    return KernelImage(
        kind="vmlinux",
        pieces=elf.segments,
        start=elf.start,
        end=elf.end,
        boot64_entry=elf.entry,
        pvh_entry=elf.pvh_entry,
        header=synthetic_setup_header(),
        cmdline_max=COMMAND_LINE_SIZE - 1,
        cmdline_limit_source=f"x86 COMMAND_LINE_SIZE, {COMMAND_LINE_SIZE} with the NUL",
        initrd_limit=VMLINUX_INITRD_ADDR_MAX + 1,
    )


def describe_bzimage(bz: BzImage) -> KernelImage:
    version = f", {bz.kernel_version}" if bz.kernel_version else ""
    return KernelImage(
        kind="bzImage",
        pieces=(ElfSegment(bz.load_address, bz.setup_size, bz.kernel_size, bz.kernel_size),),
        start=bz.load_address,
        end=bz.end,
        boot64_entry=bz.entry64,
        pvh_entry=None,
        header=bz.header,
        cmdline_max=min(bz.cmdline_size, CMDLINE_AREA_BYTES - 1),
        cmdline_limit_source="its cmdline_size",
        initrd_limit=bz.initrd_addr_max + 1,
        notes=(
            f"bzImage, boot protocol {bz.protocol}, {bz.payload_format} payload{version}",
            "bzImage: the kernel decompresses itself at CPL0, which a PVM host emulates (about"
            " 1 us per instruction): minutes for gzip, tens of minutes for xz",
        ),
        payload=(bz.payload_at, bz.payload_length, bz.payload_format),
    )


def unpack_on_host(
    kfile: ImageFile, image: KernelImage, limit: int, files: ExitStack
) -> tuple[ImageFile, KernelImage]:
    """A bzImage's payload decompressed here and described as the vmlinux it holds (see
    loader/payload.py); the bzImage itself, with a note saying why, where that fails."""
    assert image.payload is not None
    at, length, fmt = image.payload
    started = time.monotonic()
    data, why = payload.decompress(kfile.read_at("compressed payload", at, length), fmt, limit)
    if data is not None:
        inner = files.enter_context(ImageFile.from_bytes(kfile.name, "kernel", data))
        try:
            elf = describe_vmlinux(parse_elf(inner))
        except ConfigError as e:
            why = f"its payload is not a kernel kvmkit can load ({e})"
        else:
            took = time.monotonic() - started
            return inner, replace(
                elf,
                kind="bzImage",
                notes=(
                    image.notes[0],
                    f"bzImage: its {fmt} payload decompressed by kvmkit on the host"
                    f" ({approx_size(len(data))} in {took:.2f} s) and entered as the vmlinux"
                    " inside",
                ),
            )
    return kfile, replace(
        image, notes=(*image.notes, f"bzImage: {why}: the guest decompresses it itself")
    )


def describe_kernel(image: ImageFile) -> KernelImage:
    head = image.head(0x400)
    if is_elf(head):
        return describe_vmlinux(parse_elf(image))
    if is_bzimage(head):
        return describe_bzimage(parse_bzimage(image))
    raise ConfigError(
        f"kernel {image.name} is neither an ELF vmlinux nor a bzImage (no ELF magic, no"
        f' "HdrS" setup header); give the path of {KERNEL_EXPECT}'
    )


def choose_protocol(kernel: KernelImage, asked: str, name: str) -> tuple[str, list[str]]:
    if asked not in PROTOCOLS:
        raise ConfigError(f"unknown Linux boot protocol {asked!r}: use auto, pvh or boot64")
    if asked == "boot64":
        if kernel.pvh_entry is not None:
            return "boot64", ["the vmlinux also has a PVH entry; boot64 was asked for"]
        return "boot64", []
    if kernel.pvh_entry is not None:
        return "pvh", []
    if asked == "pvh":
        if kernel.kind == "bzImage":
            raise ConfigError(
                f"kernel {name} is a bzImage, which has no PVH entry: give its vmlinux (built"
                " with CONFIG_PVH=y) or use protocol boot64"
            )
        raise ConfigError(
            f"kernel {name} has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY): build it with"
            " CONFIG_PVH=y or use protocol boot64"
        )
    if kernel.kind == "vmlinux":
        return "boot64", ["the vmlinux has no PVH entry (CONFIG_PVH): using the 64-bit entry"]
    return "boot64", []


def low_ram_end(ram: GuestRam) -> int:
    """End of the RAM region that starts at 0, capped at 4 GiB."""
    for region in ram.regions:
        if region.gpa == 0:
            return min(region.end, LOW_RAM_LIMIT)
    raise ConfigError("guest RAM does not start at address 0; Linux needs RAM from 0 up")


def _overlap(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def _mib_up(n: int) -> int:
    return (n + MIB - 1) // MIB


def check_kernel_fits(
    kernel: KernelImage, name: str, low_end: int, reserved: Sequence[tuple[int, int]]
) -> None:
    span = f"{kernel.start:#x}-{kernel.end:#x}"
    if kernel.start < HIGH_MEMORY_START:
        raise ConfigError(
            f"kernel {name} loads at {kernel.start:#x}, below 1 MiB where kvmkit keeps boot data;"
            " give a kernel linked at 1 MiB or above (CONFIG_PHYSICAL_START)"
        )
    if kernel.end > MMIO_GAP_START:
        raise ConfigError(
            f"kernel {name} occupies {span}, past 3 GiB where the MMIO hole starts; give a"
            " kernel linked lower (CONFIG_PHYSICAL_START)"
        )
    if kernel.end > low_end:
        raise ConfigError(
            f"kernel {name} needs guest RAM up to {kernel.end:#x} ({span}) but the guest has"
            f" {approx_size(low_end)}: give it at least {_mib_up(kernel.end)} MiB"
        )
    for r in reserved:
        if _overlap(r, (kernel.start, kernel.end)):
            raise ConfigError(
                f"kernel {name} occupies {span}, which overlaps the reserved range"
                f" {r[0]:#x}-{r[1]:#x}; reserve guest memory elsewhere"
            )


def encode_cmdline(cmdline: str, kernel: KernelImage, name: str) -> bytes:
    raw = cmdline.encode()
    if b"\0" in raw:
        raise ConfigError("the kernel command line contains a NUL character; remove it")
    if len(raw) > kernel.cmdline_max:
        raise ConfigError(
            f"the kernel command line is {len(raw)} bytes; {kernel.kind} {name} takes at most"
            f" {kernel.cmdline_max} ({kernel.cmdline_limit_source}): shorten it"
        )
    return raw + b"\0"


def place_initrd(
    size: int,
    name: str,
    kernel: KernelImage,
    low_end: int,
    reserved: Sequence[tuple[int, int]],
) -> tuple[int, int]:
    """[start, end) for an initrd of `size` bytes: page aligned, as high as fits below
    the kernel's initrd limit and the end of low RAM, above the kernel, clear of every
    reserved range."""
    if size == 0:
        raise ConfigError(f"initrd {name} is empty; give {INITRD_EXPECT}")
    floor = page_align_up(kernel.end)
    limit = min(kernel.initrd_limit, low_end)
    holes = merge_ranges(reserved)
    top = limit
    while top - size >= floor:
        start = page_align_down(top - size)
        if start < floor:
            break
        hit = [h for h in holes if _overlap(h, (start, start + size))]
        if not hit:
            return start, start + size
        top = min(h[0] for h in hit)
    need = floor + page_align_up(size)
    need += sum(min(e, limit) - max(s, floor) for s, e in holes if s < limit and e > floor)
    if kernel.initrd_limit < low_end or need > kernel.initrd_limit:
        raise ConfigError(
            f"initrd {name} ({approx_size(size)}) does not fit between the kernel's end"
            f" ({floor:#x}) and the highest address {kernel.kind} takes an initrd at"
            f" ({kernel.initrd_limit - 1:#x}): use a smaller initrd"
        )
    raise ConfigError(
        f"initrd {name} ({approx_size(size)}) does not fit in guest RAM above the kernel (which"
        f" ends at {floor:#x}): give the guest at least {_mib_up(need)} MiB"
    )


def load_linux(
    ram: GuestRam,
    kernel: Path,
    *,
    initrd: Path | None = None,
    cmdline: str = "",
    protocol: str = "auto",
    reserved: Sequence[tuple[int, int]] = (),
    decompress_on_host: bool = True,
) -> LinuxBootPlan:
    """Load `kernel` (and `initrd`) into `ram` and return how to enter it.

    protocol: "auto" (PVH when the vmlinux has the PVH note, else the 64-bit boot
    protocol), "pvh" or "boot64". reserved: [start, end) ranges of guest-physical memory
    the VMM keeps for itself; they are reported reserved in the e820 map and nothing is
    loaded there. decompress_on_host: a bzImage's payload is decompressed by kvmkit
    and the vmlinux inside entered (False: the kernel's own decompressor runs in the
    guest). Raises ConfigError, before writing anything, for any bad input.
    """
    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown Linux boot protocol {protocol!r}: use auto, pvh or boot64")
    low_end = low_ram_end(ram)
    keep = check_ranges("reserved", reserved)
    for r in keep:
        if _overlap(r, BOOT_AREA):
            raise ConfigError(
                f"reserved range {r[0]:#x}-{r[1]:#x} overlaps kvmkit's Linux boot data at"
                f" {BOOT_AREA[0]:#x}-{BOOT_AREA[1]:#x}; reserve memory elsewhere"
            )
    with ExitStack() as files:
        kfile = files.enter_context(ImageFile.open(kernel, "kernel", KERNEL_EXPECT))
        image = describe_kernel(kfile)
        if image.payload is not None and decompress_on_host:
            kfile, image = unpack_on_host(kfile, image, low_end, files)
        chosen, notes = choose_protocol(image, protocol, kfile.name)
        check_kernel_fits(image, kfile.name, low_end, keep)
        cmd = encode_cmdline(cmdline, image, kfile.name)
        ifile = None
        initrd_range = None
        if initrd is not None:
            ifile = files.enter_context(ImageFile.open(initrd, "initrd", INITRD_EXPECT))
            initrd_range = place_initrd(ifile.size, ifile.name, image, low_end, keep)
        e820 = build_e820([(r.gpa, r.end) for r in ram.regions], keep)

        for i, piece in enumerate(image.pieces):
            kfile.copy_to(ram, piece.paddr, f"segment {i}", piece.offset, piece.filesz)
            zero_fill(ram, piece.paddr + piece.filesz, piece.memsz - piece.filesz)
        if ifile is not None and initrd_range is not None:
            ifile.copy_to(ram, initrd_range[0], "contents", 0, ifile.size)
            notes.append(
                f"initrd {approx_size(ifile.size)} at {initrd_range[0]:#x}-{initrd_range[1]:#x}"
            )
    ram.write(CMDLINE_GPA, cmd)
    if chosen == "pvh":
        assert image.pvh_entry is not None
        modules = [initrd_range] if initrd_range else []
        ram.write(PVH_MEMMAP_GPA, build_memmap(e820))
        if modules:
            ram.write(PVH_MODLIST_GPA, build_modlist(modules))
        info = build_start_info(
            cmdline_gpa=CMDLINE_GPA,
            modlist_gpa=PVH_MODLIST_GPA,
            nr_modules=len(modules),
            memmap_gpa=PVH_MEMMAP_GPA,
            memmap_entries=len(e820),
        )
        ram.write(PVH_START_INFO_GPA, info)
        entry, boot_info, tables, stack = image.pvh_entry, PVH_START_INFO_GPA, None, None
    else:
        zero_page = build_zero_page(
            image.header,
            kernel_gpa=image.start,
            cmdline_gpa=CMDLINE_GPA,
            initrd=initrd_range,
            e820=e820,
        )
        ram.write(ZERO_PAGE_GPA, zero_page)
        entry, boot_info = image.boot64_entry, ZERO_PAGE_GPA
        tables, stack = BOOT_PAGE_TABLES_GPA, BOOT_STACK_TOP
    return LinuxBootPlan(
        protocol=chosen,
        image_kind=image.kind,
        entry=entry,
        boot_info_gpa=boot_info,
        kernel_range=(image.start, image.end),
        initrd_range=initrd_range,
        cmdline_gpa=CMDLINE_GPA,
        e820=e820,
        notes=[*image.notes, *notes],
        page_tables_gpa=tables,
        stack_top=stack,
    )
