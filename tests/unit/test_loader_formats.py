"""Boot ABI layouts (zero page, setup header, PVH start info), the e820 map and the
fixed address map, checked against the offsets the kernel headers and boot.rst give."""

import ctypes
import struct

import pytest

from kvmkit.arch.x86.linux_entry import IDENTITY_MAP_BYTES, boot64_gdt, pvh_gdt
from kvmkit.arch.x86.long_mode import page_table_bytes
from kvmkit.errors import ConfigError
from kvmkit.loader import addresses as A
from kvmkit.loader.boot_params import (
    boot_params,
    build_zero_page,
    header_field_offset,
    setup_header,
    synthetic_setup_header,
)
from kvmkit.loader.e820 import E820_MAX_ENTRIES, build_e820
from kvmkit.loader.pvh import (
    build_memmap,
    build_modlist,
    build_start_info,
    hvm_memmap_table_entry,
    hvm_modlist_entry,
    hvm_start_info,
)
from tests.unit.kernel_images import HDR

# struct boot_params offsets as commented in arch/x86/include/uapi/asm/bootparam.h
BOOT_PARAMS_OFFSETS = {
    "screen_info": 0x000,
    "apm_bios_info": 0x040,
    "tboot_addr": 0x058,
    "ist_info": 0x060,
    "acpi_rsdp_addr": 0x070,
    "hd0_info": 0x080,
    "sys_desc_table": 0x0A0,
    "olpc_ofw_header": 0x0B0,
    "ext_ramdisk_image": 0x0C0,
    "ext_ramdisk_size": 0x0C4,
    "ext_cmd_line_ptr": 0x0C8,
    "edid_info": 0x140,
    "efi_info": 0x1C0,
    "alt_mem_k": 0x1E0,
    "scratch": 0x1E4,
    "e820_entries": 0x1E8,
    "eddbuf_entries": 0x1E9,
    "secure_boot": 0x1EC,
    "sentinel": 0x1EF,
    "hdr": 0x1F1,
    "edd_mbr_sig_buffer": 0x290,
    "e820_table": 0x2D0,
    "eddbuf": 0xD00,
}


def test_boot_params_layout_matches_bootparam_h():
    assert ctypes.sizeof(boot_params) == 4096
    for name, offset in BOOT_PARAMS_OFFSETS.items():
        assert getattr(boot_params, name).offset == offset, name


def test_setup_header_layout_matches_boot_rst():
    assert ctypes.sizeof(setup_header) == 0x26C - 0x1F1
    for name, (offset, _fmt) in HDR.items():
        assert header_field_offset(name) == offset, name
    assert header_field_offset("hardware_subarch") == 0x23C
    assert header_field_offset("setup_data") == 0x250
    assert header_field_offset("handover_offset") == 0x264


def test_pvh_structures_match_start_info_h():
    assert ctypes.sizeof(hvm_start_info) == 56
    offsets = {
        "magic": 0,
        "version": 4,
        "flags": 8,
        "nr_modules": 12,
        "modlist_paddr": 16,
        "cmdline_paddr": 24,
        "rsdp_paddr": 32,
        "memmap_paddr": 40,
        "memmap_entries": 48,
    }
    for name, offset in offsets.items():
        assert getattr(hvm_start_info, name).offset == offset, name
    assert ctypes.sizeof(hvm_modlist_entry) == 32 and ctypes.sizeof(hvm_memmap_table_entry) == 24
    assert hvm_memmap_table_entry.type.offset == 16


def test_start_info_leaves_absent_tables_at_zero():
    raw = build_start_info(
        cmdline_gpa=0x20000, modlist_gpa=0x6040, nr_modules=0, memmap_gpa=0x6100, memmap_entries=0
    )
    assert struct.unpack("<IIIIQQQQII", raw) == (0x336EC578, 1, 0, 0, 0, 0x20000, 0, 0, 0, 0)
    assert build_modlist([(0x1000, 0x3000)]) == struct.pack("<4Q", 0x1000, 0x2000, 0, 0)
    assert build_memmap([(0, 0x9FC00, 1)]) == struct.pack("<QQII", 0, 0x9FC00, 1, 0)


def test_synthetic_header_has_the_magic_numbers_and_limits():
    hdr = setup_header.from_buffer_copy(synthetic_setup_header())
    assert (hdr.boot_flag, hdr.header, hdr.version) == (0xAA55, 0x53726448, 0x020C)
    assert hdr.jump & 0xFF == 0xEB and 0x202 + (hdr.jump >> 8) == 0x268
    assert hdr.cmdline_size == 2047 and hdr.xloadflags & 1 and hdr.loadflags & 1


def test_zero_page_fields():
    e820 = [(0, 0x9FC00, 1), (0x100000, 0x7F00000, 1)]
    zp = build_zero_page(
        synthetic_setup_header(),
        kernel_gpa=0x1000000,
        cmdline_gpa=0x1_2345_6000,
        initrd=(0x1_0000_0000, 0x1_0000_1234),
        e820=e820,
    )
    bp = boot_params.from_buffer_copy(zp)
    assert (bp.hdr.cmd_line_ptr, bp.ext_cmd_line_ptr) == (0x23456000, 1)
    assert (bp.hdr.ramdisk_image, bp.ext_ramdisk_image) == (0, 1)
    assert (bp.hdr.ramdisk_size, bp.ext_ramdisk_size) == (0x1234, 0)
    assert bp.hdr.code32_start == 0x1000000 and bp.hdr.vid_mode == 0xFFFF
    assert bp.e820_entries == 2 and bp.sentinel == 0
    assert [(e.addr, e.size, e.type) for e in bp.e820_table[:2]] == e820


def test_e820_reserves_the_legacy_area_and_caller_ranges():
    low, high = (0, 3 << 30), (4 << 30, 6 << 30)
    assert build_e820([low, high], [(0xFEC00000, 0xFEC01000), (0xFEC01000, 0xFEC02000)]) == [
        (0, 0x9FC00, 1),
        (0x9FC00, 0x60400, 2),
        (0x100000, (3 << 30) - 0x100000, 1),
        (0xFEC00000, 0x2000, 2),  # touching ranges joined
        (4 << 30, 2 << 30, 1),
    ]
    # a reserved range inside RAM splits it
    assert build_e820([(0, 64 << 20)], [(32 << 20, 33 << 20)])[2:] == [
        (0x100000, (31 << 20), 1),
        (32 << 20, 1 << 20, 2),
        (33 << 20, 31 << 20, 1),
    ]


def test_e820_limits():
    many = [(0x1000_0000 + 0x2000 * i, 0x1000_1000 + 0x2000 * i) for i in range(E820_MAX_ENTRIES)]
    with pytest.raises(ConfigError, match="needs .* e820 entries; Linux takes 128"):
        build_e820([(0, 1 << 30)], many)
    with pytest.raises(ConfigError, match="RAM range 0x10-0x10 is empty"):
        build_e820([(0x10, 0x10)])


def test_fixed_addresses_are_disjoint_and_below_the_ebda():
    areas = {
        "gdt": (A.BOOT_GDT_GPA, A.BOOT_GDT_GPA + max(len(pvh_gdt()), len(boot64_gdt()))),
        "start_info": (A.PVH_START_INFO_GPA, A.PVH_START_INFO_GPA + 56),
        "modlist": (A.PVH_MODLIST_GPA, A.PVH_MODLIST_GPA + 32),
        "memmap": (A.PVH_MEMMAP_GPA, A.PVH_MEMMAP_GPA + 24 * E820_MAX_ENTRIES),
        "zero page": (A.ZERO_PAGE_GPA, A.ZERO_PAGE_GPA + 4096),
        "stack": (A.BOOT_STACK_GPA, A.BOOT_STACK_TOP),
        "page tables": (
            A.BOOT_PAGE_TABLES_GPA,
            A.BOOT_PAGE_TABLES_GPA + page_table_bytes(IDENTITY_MAP_BYTES),
        ),
        "cmdline": (A.CMDLINE_GPA, A.CMDLINE_GPA + A.CMDLINE_AREA_BYTES),
    }
    assert areas["page tables"][1] == A.BOOT_PAGE_TABLES_END
    spans = sorted(areas.values())
    for (_s1, e1), (s2, _e2) in zip(spans, spans[1:], strict=False):
        assert e1 <= s2
    assert A.BOOT_AREA == (spans[0][0], spans[-1][1])
    assert spans[0][0] >= 0x1000 and spans[-1][1] <= A.MPTABLE_GPA == A.LEGACY_RESERVED[0]
    assert A.BOOT_STACK_TOP % 16 == 0
