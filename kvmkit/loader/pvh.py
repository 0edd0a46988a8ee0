"""PVH boot: struct hvm_start_info and the tables it points to.

Layouts from include/xen/interface/hvm/start_info.h (version 1). The kernel is entered
at its XEN_ELFNOTE_PHYS32_ENTRY address in 32-bit protected mode with EBX holding the
start_info address; a 0 address in any field means "not present". Linux takes module 0
as its initrd and needs version >= 1 with a memory map when it runs outside Xen.
"""

import ctypes
from collections.abc import Sequence
from ctypes import c_uint32, c_uint64

from kvmkit.loader.e820 import E820Entry

XEN_HVM_START_MAGIC_VALUE = 0x336EC578
START_INFO_VERSION = 1


class hvm_start_info(ctypes.LittleEndianStructure):
    _fields_ = [
        ("magic", c_uint32),
        ("version", c_uint32),
        ("flags", c_uint32),
        ("nr_modules", c_uint32),
        ("modlist_paddr", c_uint64),
        ("cmdline_paddr", c_uint64),
        ("rsdp_paddr", c_uint64),
        ("memmap_paddr", c_uint64),
        ("memmap_entries", c_uint32),
        ("reserved", c_uint32),
    ]


class hvm_modlist_entry(ctypes.LittleEndianStructure):
    _fields_ = [
        ("paddr", c_uint64),
        ("size", c_uint64),
        ("cmdline_paddr", c_uint64),
        ("reserved", c_uint64),
    ]


class hvm_memmap_table_entry(ctypes.LittleEndianStructure):
    _fields_ = [
        ("addr", c_uint64),
        ("size", c_uint64),
        ("type", c_uint32),
        ("reserved", c_uint32),
    ]


assert ctypes.sizeof(hvm_start_info) == 56
assert ctypes.sizeof(hvm_modlist_entry) == 32
assert ctypes.sizeof(hvm_memmap_table_entry) == 24


def build_start_info(
    *,
    cmdline_gpa: int,
    modlist_gpa: int,
    nr_modules: int,
    memmap_gpa: int,
    memmap_entries: int,
    rsdp_gpa: int = 0,
) -> bytes:
    info = hvm_start_info(
        magic=XEN_HVM_START_MAGIC_VALUE,
        version=START_INFO_VERSION,
        nr_modules=nr_modules,
        modlist_paddr=modlist_gpa if nr_modules else 0,
        cmdline_paddr=cmdline_gpa,
        rsdp_paddr=rsdp_gpa,
        memmap_paddr=memmap_gpa if memmap_entries else 0,
        memmap_entries=memmap_entries,
    )
    return bytes(info)


def build_modlist(modules: Sequence[tuple[int, int]]) -> bytes:
    """One hvm_modlist_entry per [start, end) range, no per-module command lines."""
    return b"".join(bytes(hvm_modlist_entry(paddr=s, size=e - s)) for s, e in modules)


def build_memmap(e820: Sequence[E820Entry]) -> bytes:
    """The e820 map as hvm_memmap_table_entry records (the type values are the same)."""
    return b"".join(bytes(hvm_memmap_table_entry(addr=a, size=s, type=t)) for a, s, t in e820)
