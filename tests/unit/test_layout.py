import re
import struct
from pathlib import Path

import pytest

from kvmkit.arch.x86 import long_mode
from kvmkit.arch.x86.cpuid import vcpu_cpuid
from kvmkit.guests import abi
from kvmkit.memory.layout import GIB, MIB, ram_regions
from kvmkit.uapi.cpu import kvm_cpuid_entry2


def test_small_ram_is_one_region():
    (r,) = ram_regions(256 * MIB)
    assert (r.gpa, r.size, r.slot, r.offset) == (0, 256 * MIB, 0, 0)


def test_large_ram_skips_the_mmio_gap():
    low, high = ram_regions(5 * GIB)
    assert (low.gpa, low.end) == (0, 3 * GIB)
    assert (high.gpa, high.end, high.offset, high.slot) == (4 * GIB, 6 * GIB, 3 * GIB, 1)


def test_bad_sizes_refused():
    with pytest.raises(ValueError):
        ram_regions(4097)


def test_identity_page_tables_map_every_2m_page_with_user_bit():
    base = 0x200000
    tables = long_mode.identity_page_tables(base, 3 * GIB)
    assert len(tables) == long_mode.page_table_bytes(3 * GIB) == 4096 * 5
    (pml4e,) = struct.unpack_from("<Q", tables, 0)
    assert pml4e == (base + 4096) | 0x7
    pdpt = struct.unpack_from("<4Q", tables, 4096)
    assert pdpt[:3] == tuple((base + 4096 * (2 + i)) | 0x7 for i in range(3)) and pdpt[3] == 0
    pd = struct.unpack_from("<1536Q", tables, 8192)
    assert all(e == (i << 21) | 0x87 for i, e in enumerate(pd))


def test_gdt_has_flat_64bit_code_and_data():
    null, code, data = struct.unpack("<3Q", long_mode.GDT)
    assert null == 0
    assert (code >> 40) & 0xFF == 0x9B and (code >> 53) & 1 == 1  # present code, L=1
    assert (data >> 40) & 0xFF == 0x93


def test_cpuid_gets_the_apic_id():
    leaf1 = kvm_cpuid_entry2(function=1, ebx=0x00010800)
    leafb = kvm_cpuid_entry2(function=0xB, edx=0)
    out = vcpu_cpuid([leaf1, leafb], 5)
    assert out[0].ebx == 0x05010800 and out[1].edx == 5
    assert leaf1.ebx == 0x00010800  # the source list is untouched


def test_boot_info_pack_matches_the_documented_layout():
    info = abi.BootInfo(
        ram_bytes=256 * MIB, nr_vcpus=2, free_ranges=[(0x1000, 0x2000)], arg=7, flags=1
    )
    raw = info.pack()
    assert len(raw) == abi.BI_SIZE
    assert struct.unpack_from("<Q", raw, abi.BI_MAGIC)[0] == abi.BOOT_MAGIC
    assert raw[:8] == b"KKKBOOT1"
    assert struct.unpack_from("<Q", raw, abi.BI_RAM_BYTES)[0] == 256 * MIB
    assert struct.unpack_from("<II", raw, abi.BI_NR_VCPUS) == (2, 1)
    assert struct.unpack_from("<I", raw, abi.BI_NR_RANGES)[0] == 1
    assert struct.unpack_from("<Q", raw, abi.BI_ARG)[0] == 7
    assert struct.unpack_from("<QQ", raw, abi.BI_RANGES) == (0x1000, 0x2000)
    with pytest.raises(ValueError):
        abi.BootInfo(1, 1, [(0, 1)] * 5).pack()


def test_guest_header_agrees_with_abi_module():
    header = (Path(abi.__file__).parent / "src" / "kvmkit.h").read_text()
    defines = {
        m[0]: int(m[1], 0) for m in re.findall(r"#define\s+(\w+)\s+(0x[0-9a-fA-F]+|\d+)", header)
    }
    names = [n for n in dir(abi) if n.isupper()]
    assert set(defines) == set(names)
    for name in names:
        assert defines[name] == getattr(abi, name), name
