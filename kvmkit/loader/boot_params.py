"""The x86 zero page, struct boot_params, and its setup header (the Linux boot ABI).

Layouts follow arch/x86/include/uapi/asm/bootparam.h and Documentation/arch/x86/boot.rst;
sizes and the offsets kvmkit writes are asserted below and in the unit tests. The setup
header sits at offset 0x1f1 both in a bzImage file and in the zero page.
"""

import ctypes
from collections.abc import Sequence
from ctypes import c_uint8, c_uint16, c_uint32, c_uint64

from kvmkit.loader.e820 import E820_MAX_ENTRIES, E820Entry

SETUP_HEADER_OFFSET = 0x1F1
HEADER_ROOM_END = 0x290  # the setup header may grow up to here in the zero page
HDRS_MAGIC = 0x53726448  # "HdrS"
BOOT_FLAG = 0xAA55

# loadflags
LOADED_HIGH = 1 << 0
KASLR_FLAG = 1 << 1
QUIET_FLAG = 1 << 5
KEEP_SEGMENTS = 1 << 6
CAN_USE_HEAP = 1 << 7
# xloadflags
XLF_KERNEL_64 = 1 << 0
XLF_CAN_BE_LOADED_ABOVE_4G = 1 << 1

TYPE_OF_LOADER_UNDEFINED = 0xFF  # no assigned boot loader id
VID_MODE_NORMAL = 0xFFFF  # "vga=normal"
HEAP_END_PTR = 0xFE00  # end of the real-mode heap, less 0x200 (unused by the 64-bit entry)
VMLINUX_PROTOCOL = 0x020C  # 2.12: xloadflags and the ext_* fields exist
VMLINUX_KERNEL_ALIGNMENT = 0x200000  # CONFIG_PHYSICAL_ALIGN's x86-64 default
COMMAND_LINE_SIZE = 2048  # x86 COMMAND_LINE_SIZE, the terminating NUL included


class setup_header(ctypes.LittleEndianStructure):
    _pack_ = 1
    _fields_ = [
        ("setup_sects", c_uint8),
        ("root_flags", c_uint16),
        ("syssize", c_uint32),
        ("ram_size", c_uint16),
        ("vid_mode", c_uint16),
        ("root_dev", c_uint16),
        ("boot_flag", c_uint16),
        ("jump", c_uint16),
        ("header", c_uint32),
        ("version", c_uint16),
        ("realmode_swtch", c_uint32),
        ("start_sys_seg", c_uint16),
        ("kernel_version", c_uint16),
        ("type_of_loader", c_uint8),
        ("loadflags", c_uint8),
        ("setup_move_size", c_uint16),
        ("code32_start", c_uint32),
        ("ramdisk_image", c_uint32),
        ("ramdisk_size", c_uint32),
        ("bootsect_kludge", c_uint32),
        ("heap_end_ptr", c_uint16),
        ("ext_loader_ver", c_uint8),
        ("ext_loader_type", c_uint8),
        ("cmd_line_ptr", c_uint32),
        ("initrd_addr_max", c_uint32),
        ("kernel_alignment", c_uint32),
        ("relocatable_kernel", c_uint8),
        ("min_alignment", c_uint8),
        ("xloadflags", c_uint16),
        ("cmdline_size", c_uint32),
        ("hardware_subarch", c_uint32),
        ("hardware_subarch_data", c_uint64),
        ("payload_offset", c_uint32),
        ("payload_length", c_uint32),
        ("setup_data", c_uint64),
        ("pref_address", c_uint64),
        ("init_size", c_uint32),
        ("handover_offset", c_uint32),
        ("kernel_info_offset", c_uint32),
    ]


class boot_e820_entry(ctypes.LittleEndianStructure):
    _pack_ = 1
    _fields_ = [("addr", c_uint64), ("size", c_uint64), ("type", c_uint32)]


EDD_MBR_SIG_MAX = 16
EDDMAXNR = 6
EDD_INFO_SIZE = 82  # struct edd_info, opaque here


class boot_params(ctypes.LittleEndianStructure):
    """Opaque firmware structures (screen_info, apm_bios_info, ist_info, edid_info,
    efi_info, edd_info) are byte arrays of their ABI size: kvmkit leaves them zero."""

    _pack_ = 1
    _fields_ = [
        ("screen_info", c_uint8 * 0x40),  # 0x000
        ("apm_bios_info", c_uint8 * 0x14),  # 0x040
        ("_pad2", c_uint8 * 4),  # 0x054
        ("tboot_addr", c_uint64),  # 0x058
        ("ist_info", c_uint8 * 0x10),  # 0x060
        ("acpi_rsdp_addr", c_uint64),  # 0x070
        ("_pad3", c_uint8 * 8),  # 0x078
        ("hd0_info", c_uint8 * 16),  # 0x080
        ("hd1_info", c_uint8 * 16),  # 0x090
        ("sys_desc_table", c_uint8 * 16),  # 0x0a0
        ("olpc_ofw_header", c_uint8 * 16),  # 0x0b0
        ("ext_ramdisk_image", c_uint32),  # 0x0c0
        ("ext_ramdisk_size", c_uint32),  # 0x0c4
        ("ext_cmd_line_ptr", c_uint32),  # 0x0c8
        ("_pad4", c_uint8 * 116),  # 0x0cc
        ("edid_info", c_uint8 * 0x80),  # 0x140
        ("efi_info", c_uint8 * 0x20),  # 0x1c0
        ("alt_mem_k", c_uint32),  # 0x1e0
        ("scratch", c_uint32),  # 0x1e4
        ("e820_entries", c_uint8),  # 0x1e8
        ("eddbuf_entries", c_uint8),  # 0x1e9
        ("edd_mbr_sig_buf_entries", c_uint8),  # 0x1ea
        ("kbd_status", c_uint8),  # 0x1eb
        ("secure_boot", c_uint8),  # 0x1ec
        ("_pad5", c_uint8 * 2),  # 0x1ed
        ("sentinel", c_uint8),  # 0x1ef
        ("_pad6", c_uint8 * 1),  # 0x1f0
        ("hdr", setup_header),  # 0x1f1
        ("_pad7", c_uint8 * (HEADER_ROOM_END - SETUP_HEADER_OFFSET - 0x7B)),
        ("edd_mbr_sig_buffer", c_uint32 * EDD_MBR_SIG_MAX),  # 0x290
        ("e820_table", boot_e820_entry * E820_MAX_ENTRIES),  # 0x2d0
        ("_pad8", c_uint8 * 48),  # 0xcd0
        ("eddbuf", c_uint8 * (EDD_INFO_SIZE * EDDMAXNR)),  # 0xd00
        ("_pad9", c_uint8 * 276),  # 0xeec
    ]


SETUP_HEADER_SIZE = ctypes.sizeof(setup_header)
SETUP_HEADER_END = SETUP_HEADER_OFFSET + SETUP_HEADER_SIZE
assert SETUP_HEADER_SIZE == 0x7B
assert ctypes.sizeof(boot_e820_entry) == 20
assert ctypes.sizeof(boot_params) == 0x1000
assert boot_params.hdr.offset == SETUP_HEADER_OFFSET
assert boot_params.e820_table.offset == 0x2D0
assert boot_params.edd_mbr_sig_buffer.offset == HEADER_ROOM_END


def header_field_offset(name: str) -> int:
    """Offset of a setup header field in the zero page (and in a bzImage file)."""
    return SETUP_HEADER_OFFSET + int(getattr(setup_header, name).offset)


def synthetic_setup_header() -> bytes:
    """The setup header a vmlinux lacks, filled in as the boot protocol asks of a boot
    loader that builds the zero page itself: magic numbers, protocol 2.12, a 64-bit
    kernel loaded high, the x86 command line size."""
    hdr = setup_header(
        boot_flag=BOOT_FLAG,
        jump=0xEB | ((header_field_offset("kernel_info_offset") - 0x202) << 8),  # ends at 0x268
        header=HDRS_MAGIC,
        version=VMLINUX_PROTOCOL,
        loadflags=LOADED_HIGH,
        kernel_alignment=VMLINUX_KERNEL_ALIGNMENT,
        xloadflags=XLF_KERNEL_64,
        cmdline_size=COMMAND_LINE_SIZE - 1,
        initrd_addr_max=0x37FFFFFF,
    )
    return bytes(hdr)


def build_zero_page(
    header: bytes,
    *,
    kernel_gpa: int,
    cmdline_gpa: int,
    initrd: tuple[int, int] | None,
    e820: Sequence[E820Entry],
) -> bytes:
    """The 4096-byte zero page: `header` (the kernel's setup header bytes from 0x1f1, as
    long as the kernel says it is) copied into an all-zero boot_params, then the fields a
    boot loader writes: loader type, load flags, video mode, heap end, code32_start, the
    command line pointer, the initrd [start, end) and the e820 map."""
    if len(e820) > E820_MAX_ENTRIES:
        raise ValueError(f"{len(e820)} e820 entries; the zero page holds {E820_MAX_ENTRIES}")
    bp = boot_params()
    room = HEADER_ROOM_END - SETUP_HEADER_OFFSET
    ctypes.memmove(ctypes.addressof(bp) + SETUP_HEADER_OFFSET, header, min(len(header), room))
    hdr = bp.hdr
    hdr.type_of_loader = TYPE_OF_LOADER_UNDEFINED
    hdr.loadflags = (hdr.loadflags | CAN_USE_HEAP) & ~(KEEP_SEGMENTS | QUIET_FLAG)
    hdr.heap_end_ptr = HEAP_END_PTR
    hdr.vid_mode = VID_MODE_NORMAL
    hdr.code32_start = kernel_gpa & 0xFFFFFFFF
    hdr.cmd_line_ptr = cmdline_gpa & 0xFFFFFFFF
    bp.ext_cmd_line_ptr = cmdline_gpa >> 32
    if initrd is not None:
        start, end = initrd
        hdr.ramdisk_image = start & 0xFFFFFFFF
        bp.ext_ramdisk_image = start >> 32
        hdr.ramdisk_size = (end - start) & 0xFFFFFFFF
        bp.ext_ramdisk_size = (end - start) >> 32
    bp.e820_entries = len(e820)
    for i, (addr, size, type_) in enumerate(e820):
        bp.e820_table[i] = boot_e820_entry(addr, size, type_)
    return bytes(bp)
