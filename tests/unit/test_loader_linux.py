"""load_linux on synthetic vmlinux and bzImage files: every path and every refusal."""

import os
import struct
from pathlib import Path

import pytest

from kvmkit.errors import ConfigError
from kvmkit.loader import load_linux
from kvmkit.loader.addresses import (
    BOOT_GDT_GPA,
    BOOT_PAGE_TABLES_GPA,
    BOOT_STACK_TOP,
    CMDLINE_GPA,
    PVH_MEMMAP_GPA,
    PVH_MODLIST_GPA,
    PVH_START_INFO_GPA,
    ZERO_PAGE_GPA,
)
from tests.unit.kernel_images import (
    KERNEL_PADDR,
    MIB,
    FakeRam,
    Segment,
    elf_note,
    hdr_get,
    make_bzimage,
    make_elf,
    pvh_note,
)

PVH_ENTRY = KERNEL_PADDR + 0x40


@pytest.fixture
def files(tmp_path):
    def write(name: str, data: bytes) -> Path:
        p = tmp_path / name
        p.write_bytes(data)
        return p

    return write


def zero_page_e820(ram: FakeRam) -> list[tuple[int, int, int]]:
    n = ram.u(ZERO_PAGE_GPA + 0x1E8, "B")
    raw = ram.read(ZERO_PAGE_GPA + 0x2D0, 20 * n)
    return [struct.unpack_from("<QQI", raw, 20 * i) for i in range(n)]


# -- vmlinux through PVH -------------------------------------------------------------


def test_vmlinux_with_pvh_note_boots_through_pvh(files):
    text = bytes(range(256)) * 48  # 12 KiB
    kernel = files("vmlinux", make_elf([Segment(KERNEL_PADDR, text, 0x5000)], pvh_entry=PVH_ENTRY))
    initrd = files("initrd", b"\x07" * 5000)
    ram = FakeRam(64 * MIB)
    ram.write(KERNEL_PADDR + len(text), b"\xaa" * 0x100)  # stale bytes where the bss goes
    plan = load_linux(ram, kernel, initrd=initrd, cmdline="console=ttyS0 quiet")

    assert (plan.protocol, plan.image_kind) == ("pvh", "vmlinux")
    assert plan.entry == PVH_ENTRY and plan.boot_info_gpa == PVH_START_INFO_GPA
    assert plan.kernel_range == (KERNEL_PADDR, KERNEL_PADDR + 0x5000)
    assert plan.page_tables_gpa is None and plan.gdt_gpa == BOOT_GDT_GPA
    assert ram.read(KERNEL_PADDR, len(text)) == text
    assert ram.read(KERNEL_PADDR + len(text), 0x2000) == bytes(0x2000)  # bss zeroed
    assert ram.read(CMDLINE_GPA, 20) == b"console=ttyS0 quiet\0"

    # the initrd: page aligned, as high as it fits under 64 MiB, above the kernel
    start, end = plan.initrd_range
    assert end - start == 5000 and start % 4096 == 0 and 64 * MIB - 4096 < end <= 64 * MIB
    assert ram.read(start, 5000) == b"\x07" * 5000

    magic, version, flags, nr_modules, modlist, cmdline, rsdp, memmap, entries = struct.unpack(
        "<IIIIQQQQI", ram.read(PVH_START_INFO_GPA, 52)
    )
    assert (magic, version, flags, nr_modules) == (0x336EC578, 1, 0, 1)
    assert (modlist, cmdline, rsdp, memmap) == (PVH_MODLIST_GPA, CMDLINE_GPA, 0, PVH_MEMMAP_GPA)
    assert struct.unpack("<QQQQ", ram.read(PVH_MODLIST_GPA, 32)) == (start, 5000, 0, 0)
    table = [struct.unpack("<QQII", ram.read(PVH_MEMMAP_GPA + 24 * i, 24)) for i in range(entries)]
    assert [t[:3] for t in table] == [tuple(e) for e in plan.e820]
    assert plan.e820 == [(0, 0x9FC00, 1), (0x9FC00, 0x60400, 2), (0x100000, 63 * MIB, 1)]
    assert any("initrd" in n for n in plan.notes)


def test_pvh_without_initrd_has_no_modules(files):
    kernel = files("vmlinux", make_elf(pvh_entry=PVH_ENTRY))
    ram = FakeRam(16 * MIB)
    plan = load_linux(ram, kernel)
    assert plan.initrd_range is None
    assert struct.unpack("<IQ", ram.read(PVH_START_INFO_GPA + 12, 12)) == (0, 0)
    assert ram.read(CMDLINE_GPA, 1) == b"\0"


def test_four_byte_pvh_note_and_other_notes_are_read(files):
    notes = elf_note(b"GNU\0", 3, b"\x11" * 20) + pvh_note(PVH_ENTRY, size=4)
    kernel = files("vmlinux", make_elf(notes=notes))
    plan = load_linux(FakeRam(16 * MIB), kernel)
    assert (plan.protocol, plan.entry) == ("pvh", PVH_ENTRY)


# -- vmlinux through the 64-bit boot protocol ------------------------------------------


def test_vmlinux_without_note_uses_the_64bit_entry_and_a_synthesised_header(files):
    kernel = files("vmlinux", make_elf(entry=KERNEL_PADDR + 0x10))
    initrd = files("initrd", b"\x01" * 4096)
    ram = FakeRam(32 * MIB)
    plan = load_linux(ram, kernel, initrd=initrd, cmdline="root=/dev/vda")

    assert (plan.protocol, plan.image_kind, plan.entry) == (
        "boot64",
        "vmlinux",
        KERNEL_PADDR + 0x10,
    )
    assert plan.boot_info_gpa == ZERO_PAGE_GPA
    assert (plan.page_tables_gpa, plan.stack_top) == (BOOT_PAGE_TABLES_GPA, BOOT_STACK_TOP)
    assert any("no PVH entry" in n for n in plan.notes)
    zp = ram.read(ZERO_PAGE_GPA, 4096)
    assert hdr_get(zp, "boot_flag") == 0xAA55 and hdr_get(zp, "header") == 0x53726448
    assert hdr_get(zp, "version") >= 0x020C
    assert hdr_get(zp, "type_of_loader") == 0xFF
    assert hdr_get(zp, "loadflags") & 0x80 and not hdr_get(zp, "loadflags") & 0x40
    assert hdr_get(zp, "cmd_line_ptr") == CMDLINE_GPA and zp[0xC8:0xCC] == bytes(4)
    start, end = plan.initrd_range
    assert (hdr_get(zp, "ramdisk_image"), hdr_get(zp, "ramdisk_size")) == (start, 4096)
    assert zp[0x1EF] == 0  # sentinel clear: the kernel keeps the ext_* fields
    assert zero_page_e820(ram) == [tuple(e) for e in plan.e820]


def test_boot64_can_be_asked_for_a_pvh_kernel(files):
    kernel = files("vmlinux", make_elf(pvh_entry=PVH_ENTRY))
    plan = load_linux(FakeRam(16 * MIB), kernel, protocol="boot64")
    assert (plan.protocol, plan.entry) == ("boot64", KERNEL_PADDR)
    assert any("PVH entry" in n for n in plan.notes)


def test_vmlinux_command_line_limit_is_2047_bytes(files):
    kernel = files("vmlinux", make_elf())
    ram = FakeRam(16 * MIB)
    load_linux(ram, kernel, cmdline="x" * 2047)
    assert ram.read(CMDLINE_GPA + 2047, 1) == b"\0"
    with pytest.raises(ConfigError, match=r"2048 bytes; vmlinux .* at most 2047 .*shorten"):
        load_linux(ram, kernel, cmdline="x" * 2048)


# -- bzImage -------------------------------------------------------------------------


def test_bzimage_loads_its_protected_mode_part_at_pref_address(files):
    image = make_bzimage(pref_address=0x200000, init_size=0x400000, initrd_addr_max=0x1FFFFFF)
    kernel = files("bzImage", image)
    initrd = files("initrd", b"\x05" * 10000)
    ram = FakeRam(64 * MIB)
    plan = load_linux(ram, kernel, initrd=initrd, cmdline="a b c")

    assert (plan.protocol, plan.image_kind) == ("boot64", "bzImage")
    assert plan.entry == 0x200000 + 0x200
    assert plan.kernel_range == (0x200000, 0x600000)  # pref_address + init_size
    setup = 5 * 512
    assert ram.read(0x200000, len(image) - setup) == image[setup:]
    start, end = plan.initrd_range
    assert end <= 0x2000000 and start >= 0x600000 and start % 4096 == 0  # below initrd_addr_max
    assert end > 0x2000000 - 4096  # as high as it fits
    zp = ram.read(ZERO_PAGE_GPA, 4096)
    # the kernel's header is copied ...
    for name in (
        "setup_sects",
        "version",
        "kernel_version",
        "init_size",
        "pref_address",
        "xloadflags",
        "kernel_alignment",
        "payload_offset",
    ):
        assert hdr_get(zp, name) == hdr_get(image, name), name
    # ... and the loader's fields written
    assert hdr_get(zp, "type_of_loader") == 0xFF
    assert hdr_get(zp, "loadflags") == 0x01 | 0x80  # LOADED_HIGH, CAN_USE_HEAP
    assert hdr_get(zp, "cmd_line_ptr") == CMDLINE_GPA
    assert (hdr_get(zp, "ramdisk_image"), hdr_get(zp, "ramdisk_size")) == (start, 10000)
    # nothing past the header's own end (0x26c) comes from the file
    assert zp[0x26C:0x290] == bytes(0x290 - 0x26C)
    notes = " ".join(plan.notes)
    assert "lz4" in notes and "6.99.0-test" in notes
    assert "kvmkit does not decompress lz4 payloads: the guest decompresses it itself" in notes


def test_a_bzimage_whose_payload_kvmkit_reads_is_entered_as_the_vmlinux_inside(files):
    """Decompressed on the host: the ELF's segments land at their addresses and its
    PVH entry is used, as for the vmlinux itself; the guest's decompressor never runs."""
    import gzip

    text = bytes(range(256)) * 48
    elf = make_elf([Segment(KERNEL_PADDR, text, 0x5000)], pvh_entry=PVH_ENTRY)
    payload = gzip.compress(elf) + len(elf).to_bytes(4, "little")
    kernel = files("bzImage", make_bzimage(payload=payload))
    ram = FakeRam(64 * MIB)
    plan = load_linux(ram, kernel, cmdline="a")
    assert (plan.image_kind, plan.protocol, plan.entry) == ("bzImage", "pvh", PVH_ENTRY)
    assert ram.read(KERNEL_PADDR, len(text)) == text
    assert "gzip payload decompressed by kvmkit on the host" in " ".join(plan.notes)

    ram = FakeRam(64 * MIB)  # the same file, the kernel's own decompressor asked for
    plan = load_linux(ram, kernel, cmdline="a", decompress_on_host=False)
    assert (plan.protocol, plan.entry) == ("boot64", 0x100000 + 0x200)


def test_bzimage_setup_sects_zero_means_four(files):
    image = make_bzimage(setup_sects=0)
    ram = FakeRam(16 * MIB)
    load_linux(ram, files("bzImage", image))
    assert ram.read(0x100000, 16) == image[5 * 512 : 5 * 512 + 16]


def test_bzimage_command_line_limit_is_its_cmdline_size(files):
    kernel = files("bzImage", make_bzimage(cmdline_size=100))
    load_linux(FakeRam(16 * MIB), kernel, cmdline="y" * 100)
    with pytest.raises(
        ConfigError, match=r"101 bytes; bzImage .* at most 100 \(its cmdline_size\)"
    ):
        load_linux(FakeRam(16 * MIB), kernel, cmdline="y" * 101)


def test_pvh_cannot_enter_a_bzimage(files):
    kernel = files("bzImage", make_bzimage())
    with pytest.raises(ConfigError, match="bzImage, which has no PVH entry: give its vmlinux"):
        load_linux(FakeRam(16 * MIB), kernel, protocol="pvh")


# -- refusals ------------------------------------------------------------------------


def refused(files, data: bytes, match: str, **kw) -> None:
    kernel = files("kernel", data)
    ram = FakeRam(kw.pop("ram", 64 * MIB))
    with pytest.raises(ConfigError, match=match) as info:
        load_linux(ram, kernel, **kw)
    assert "\n" not in str(info.value)
    assert ram.written_bytes == 0  # refused before anything was written


def test_not_a_kernel(files):
    refused(files, b"#!/bin/sh\necho hello\n" * 50, "neither an ELF vmlinux nor a bzImage")
    refused(files, b"", "neither an ELF vmlinux nor a bzImage")


def test_other_architectures(files):
    refused(files, make_elf(machine=183), "built for AArch64, not x86-64")
    refused(files, make_elf(machine=243), "built for RISC-V")
    refused(files, make_elf(ei_class=1, machine=3), "32-bit little-endian ELF file for i386")
    refused(files, make_elf(ei_data=2, machine=21), "big-endian")
    refused(files, make_elf(e_type=1), "not an executable")
    refused(files, make_bzimage(xloadflags=0), "no 64-bit entry point")
    refused(files, make_bzimage(version=0x0209), "boot protocol 2.09")


def test_truncated_images(files):
    elf = make_elf()
    refused(files, elf[:40], "truncated: its ELF header")
    refused(files, elf[:100], "truncated: its program header table")
    refused(files, elf[: len(elf) - 10], "truncated: its segment 0")
    noted = make_elf(pvh_entry=PVH_ENTRY)
    cut = bytearray(noted)
    struct.pack_into("<Q", cut, 64 + 32, 0x100000)  # the note segment's p_filesz
    refused(files, bytes(cut), "truncated: its note segment 0")
    bz = make_bzimage()
    refused(files, bz[:0x250], "truncated: its setup header")
    refused(files, bz[: 5 * 512], "truncated: its real-mode setup code")
    refused(files, bz[: 5 * 512 + 0x310], "truncated: its protected-mode kernel")
    refused(files, make_bzimage(syssize=0x10000), r"truncated: its protected-mode kernel \(syssize")
    refused(files, make_bzimage(header_end=0x230), "setup header ends at 0x230")


def test_damaged_elf(files):
    refused(files, make_elf(phentsize=64), "64-byte program headers")
    refused(files, make_elf(entry=0x5000000), "entry point 0x5000000 is outside")
    refused(files, make_elf(segments=[Segment(KERNEL_PADDR, b"x" * 100, 10)]), "more file bytes")
    refused(files, make_elf(segments=[]), "no program headers")
    refused(files, make_elf(segments=[], notes=pvh_note(PVH_ENTRY)), "no loadable segments")
    refused(files, make_elf(pvh_entry=0x7000000), "PVH entry 0x7000000 is outside")
    refused(files, make_elf(notes=elf_note(b"Xen\0", 18, b"\1\2")), "2-byte value")
    refused(files, make_elf(notes=struct.pack("<III", 4, 999, 18) + b"Xen\0"), "runs past")


def test_kernel_needing_more_memory_says_how_much(files):
    big = make_elf([Segment(KERNEL_PADDR, b"k" * 4096, 19 * MIB)])  # ends at 20 MiB
    refused(files, big, r"up to 0x1400000 .* has 16 MiB: give it at least 20 MiB", ram=16 * MIB)
    bz = make_bzimage(pref_address=0x1000000, init_size=0x3400000)  # 16 + 52 MiB
    refused(files, bz, "give it at least 68 MiB", ram=64 * MIB)
    refused(files, make_elf([Segment(0x80000, b"k" * 64)]), "below 1 MiB")
    refused(files, make_elf([Segment(0xC0000000, b"k" * 64)]), "MMIO hole")


def test_initrd_larger_than_ram_allows_says_how_much(files, tmp_path):
    kernel = files("vmlinux", make_elf())  # occupies 1 MiB + 20 KiB
    initrd = tmp_path / "initrd"
    with open(initrd, "wb") as f:
        f.truncate(40 * MIB)  # sparse: the loader must refuse it without reading it
    ram = FakeRam(32 * MIB)
    with pytest.raises(ConfigError, match=r"initrd .* \(40 MiB\) does not fit .* at least 42 MiB"):
        load_linux(ram, kernel, initrd=initrd)
    assert ram.written_bytes == 0
    load_linux(FakeRam(42 * MIB), kernel, initrd=initrd, protocol="boot64")  # and 42 MiB do


def test_initrd_above_the_kernels_initrd_limit_is_refused(files):
    kernel = files("bzImage", make_bzimage(init_size=0x100000, initrd_addr_max=0x2FFFFF))
    initrd = files("initrd", bytes(2 * MIB))
    with pytest.raises(
        ConfigError, match=r"highest address bzImage takes an initrd at \(0x2fffff\)"
    ):
        load_linux(FakeRam(64 * MIB), kernel, initrd=initrd)


def test_missing_unreadable_and_empty_files(files, tmp_path):
    kernel = files("vmlinux", make_elf())
    with pytest.raises(ConfigError, match="cannot read kernel .*nope: No such file or directory"):
        load_linux(FakeRam(16 * MIB), tmp_path / "nope")
    with pytest.raises(ConfigError, match="kernel .* is not a regular file; give the path of"):
        load_linux(FakeRam(16 * MIB), tmp_path)
    with pytest.raises(ConfigError, match="kernel /dev/zero is not a regular file"):
        load_linux(FakeRam(16 * MIB), Path("/dev/zero"))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # no writer: opening it must not hang
    with pytest.raises(ConfigError, match="initrd .*fifo is not a regular file"):
        load_linux(FakeRam(16 * MIB), kernel, initrd=fifo)
    with pytest.raises(ConfigError, match="cannot read initrd .*gone"):
        load_linux(FakeRam(16 * MIB), kernel, initrd=tmp_path / "gone")
    with pytest.raises(ConfigError, match="initrd .* is empty"):
        load_linux(FakeRam(16 * MIB), kernel, initrd=files("empty", b""))
    if os.geteuid() != 0:  # root reads anything
        locked = files("locked", make_elf())
        locked.chmod(0)
        with pytest.raises(ConfigError, match="Permission denied"):
            load_linux(FakeRam(16 * MIB), locked)


def test_bad_arguments(files):
    kernel = files("vmlinux", make_elf())
    with pytest.raises(ConfigError, match="unknown Linux boot protocol 'efi'"):
        load_linux(FakeRam(16 * MIB), kernel, protocol="efi")
    with pytest.raises(ConfigError, match="no PVH entry note .* CONFIG_PVH=y"):
        load_linux(FakeRam(16 * MIB), kernel, protocol="pvh")
    with pytest.raises(ConfigError, match="NUL"):
        load_linux(FakeRam(16 * MIB), kernel, cmdline="a\0b")


# -- reserved ranges and large RAM ------------------------------------------------------


def test_reserved_ranges_are_in_the_map_and_the_initrd_avoids_them(files):
    kernel = files("vmlinux", make_elf())
    initrd = files("initrd", bytes(3 * 4096))
    top = (60 * MIB, 64 * MIB)
    plan = load_linux(
        FakeRam(64 * MIB), kernel, initrd=initrd, reserved=[top, (0xFEB00000, 0xFEC00000)]
    )
    assert plan.initrd_range[1] <= 60 * MIB
    assert (60 * MIB, 4 * MIB, 2) in plan.e820 and (0xFEB00000, MIB, 2) in plan.e820
    assert (0x100000, 59 * MIB, 1) in plan.e820


def test_reserved_ranges_that_cannot_work_are_refused(files):
    kernel = files("vmlinux", make_elf())
    with pytest.raises(ConfigError, match="overlaps the reserved range"):
        load_linux(FakeRam(16 * MIB), kernel, reserved=[(0x100000, 0x101000)])
    with pytest.raises(ConfigError, match="overlaps kvmkit's Linux boot data"):
        load_linux(FakeRam(16 * MIB), kernel, reserved=[(0x7000, 0x8000)])
    with pytest.raises(ConfigError, match="reserved range 0x5000-0x4000 is empty"):
        load_linux(FakeRam(16 * MIB), kernel, reserved=[(0x5000, 0x4000)])


def test_ram_above_4g_is_in_the_map_and_the_initrd_stays_low(files):
    kernel = files("vmlinux", make_elf())
    initrd = files("initrd", b"i" * 100)
    plan = load_linux(FakeRam(5 << 30), kernel, initrd=initrd)
    assert plan.e820[-1] == (4 << 30, 2 << 30, 1)
    assert (0x100000, (3 << 30) - 0x100000, 1) in plan.e820
    assert plan.initrd_range[1] <= 0x38000000  # boot.rst's default limit for a vmlinux
