"""vCPU state for the PVH and 64-bit Linux entries, and the GDT each one writes."""

import struct

import pytest

from kvmkit.arch.x86.linux_entry import linux_entry
from kvmkit.uapi.cpu import kvm_sregs

GDT_GPA, TABLES, STACK = 0x1000, 0x9000, 0x9000


def descriptor(gdt: bytes, selector: int) -> dict[str, int]:
    (d,) = struct.unpack_from("<Q", gdt, selector)
    limit = (d & 0xFFFF) | ((d >> 48) & 0xF) << 16
    g = (d >> 55) & 1
    return {
        "base": ((d >> 16) & 0xFFFFFF) | ((d >> 56) & 0xFF) << 24,
        "limit": (limit << 12 | 0xFFF) if g else limit,
        "type": (d >> 40) & 0xF,
        "s": (d >> 44) & 1,
        "dpl": (d >> 45) & 3,
        "present": (d >> 47) & 1,
        "l": (d >> 53) & 1,
        "db": (d >> 54) & 1,
        "g": g,
    }


def assert_matches_gdt(gdt: bytes, seg, selector: int) -> None:
    assert seg.selector == selector
    d = descriptor(gdt, selector)
    for name, value in d.items():
        assert getattr(seg, name) == value, (selector, name)


def test_pvh_entry_is_flat_32bit_protected_mode():
    e = linux_entry("pvh", 0x1000850, 0x6000, GDT_GPA)
    assert (e.regs.rip, e.regs.rbx, e.regs.rflags) == (0x1000850, 0x6000, 0x2)  # IF, TF clear
    ((gpa, gdt),) = e.writes
    assert gpa == GDT_GPA
    s = e.fill_sregs(kvm_sregs(apic_base=0xFEE00900))
    assert s.apic_base == 0xFEE00900  # kept
    assert_matches_gdt(gdt, s.cs, 0x10)
    assert (s.cs.type, s.cs.db, s.cs.l, s.cs.base, s.cs.limit) == (0xB, 1, 0, 0, 0xFFFFFFFF)
    for seg in (s.ds, s.es, s.ss):
        assert_matches_gdt(gdt, seg, 0x18)
        assert (seg.type, seg.db, seg.limit) == (0x3, 1, 0xFFFFFFFF)
    assert_matches_gdt(gdt, s.tr, 0x20)
    assert (s.tr.base, s.tr.limit, s.tr.type, s.tr.s) == (0, 0x67, 0xB, 0)
    assert (s.gdt.base, s.gdt.limit) == (GDT_GPA, len(gdt) - 1)
    assert s.cr0 & 1 and not s.cr0 & (1 << 31) and s.cr0 & ~0x11 == 0  # PE (+ET), no paging
    assert (s.cr3, s.cr4, s.efer) == (0, 0, 0)


def test_boot64_entry_is_long_mode_with_boot_cs_and_ds():
    e = linux_entry("boot64", 0x1000200, 0x7000, GDT_GPA, TABLES, STACK)
    assert (e.regs.rip, e.regs.rsi, e.regs.rsp, e.regs.rflags) == (0x1000200, 0x7000, STACK, 0x2)
    writes = dict(e.writes)
    gdt, tables = writes[GDT_GPA], writes[TABLES]
    s = e.fill_sregs(kvm_sregs())
    assert_matches_gdt(gdt, s.cs, 0x10)
    assert (s.cs.l, s.cs.db, s.cs.type) == (1, 0, 0xB)
    for seg in (s.ds, s.es, s.ss):
        assert_matches_gdt(gdt, seg, 0x18)
    assert (s.tr.selector, s.tr.limit, s.tr.type) == (0x20, 0x67, 0xB)
    assert struct.unpack_from("<Q", gdt, 0x28) == (0,)  # upper half of the 64-bit TSS entry
    assert s.cr3 == TABLES and s.cr0 & (1 << 31) and s.cr0 & 1
    assert s.cr4 & (1 << 5) and s.efer & (1 << 8) and s.efer & (1 << 10)
    # [0, 4 GiB) identity mapped with 2 MiB pages, U=1 at every level (PVM hosts)
    assert len(tables) == 6 * 4096
    pml4e, pdpte0 = (
        struct.unpack_from("<Q", tables, 0)[0],
        struct.unpack_from("<Q", tables, 4096)[0],
    )
    assert pml4e == (TABLES + 4096) | 7 and pdpte0 == (TABLES + 8192) | 7
    pds = struct.unpack_from("<2048Q", tables, 8192)
    assert all(e == (i << 21) | 0x87 for i, e in enumerate(pds))
    assert TABLES + len(tables) <= 0xF000


def test_bad_entry_requests():
    with pytest.raises(ValueError, match="page tables and a stack"):
        linux_entry("boot64", 0x1000000, 0x7000, GDT_GPA)
    with pytest.raises(ValueError, match="unknown"):
        linux_entry("efi", 0, 0, GDT_GPA)
    with pytest.raises(ValueError, match="below 4 GiB"):
        linux_entry("pvh", 1 << 32, 0x6000, GDT_GPA)
