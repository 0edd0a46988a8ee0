"""64-bit long mode: a flat GDT, identity-mapped page tables, and the CPU state to enter it.

Every page-table entry carries U=1: harmless for CPL0 code under a normal KVM,
and what a PVM host needs to run CPL0 guest code natively.
"""

import struct

from kvmkit.uapi.cpu import kvm_regs, kvm_segment, kvm_sregs

CR0_PE = 1 << 0
CR0_MP = 1 << 1
CR0_ET = 1 << 4
CR0_NE = 1 << 5
CR0_WP = 1 << 16
CR0_AM = 1 << 18
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
CR4_OSFXSR = 1 << 9
CR4_OSXMMEXCPT = 1 << 10
EFER_LME = 1 << 8
EFER_LMA = 1 << 10

LONG_MODE_CR0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_AM | CR0_PG
LONG_MODE_CR4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT
LONG_MODE_EFER = EFER_LME | EFER_LMA

PTE_PRESENT = 1 << 0
PTE_WRITE = 1 << 1
PTE_USER = 1 << 2
PTE_LARGE = 1 << 7
TABLE_FLAGS = PTE_PRESENT | PTE_WRITE | PTE_USER
LEAF_2M_FLAGS = TABLE_FLAGS | PTE_LARGE  # 0x87

PAGE = 4096
GIB = 1 << 30
MAX_IDENTITY_MAP = 512 * GIB  # one PDPT

SELECTOR_CODE64 = 0x08
SELECTOR_DATA = 0x10
# Flat descriptors, base 0, limit 0xFFFFF pages: 64-bit code (type 0xB, S, P, L, G),
# 32-bit code (type 0xB, S, P, D/B, G), data (type 0x3, S, P, D/B, G)
CODE64_DESCRIPTOR = 0x00AF9B000000FFFF
CODE32_DESCRIPTOR = 0x00CF9B000000FFFF
DATA_DESCRIPTOR = 0x00CF93000000FFFF
# null, 64-bit code, data
GDT = struct.pack("<3Q", 0, CODE64_DESCRIPTOR, DATA_DESCRIPTOR)


def page_table_bytes(top_gpa: int) -> int:
    """Size of the tables `identity_page_tables` builds to map [0, top_gpa)."""
    return PAGE * (2 + _pd_count(top_gpa))


def _pd_count(top_gpa: int) -> int:
    if not 0 < top_gpa <= MAX_IDENTITY_MAP:
        raise ValueError(f"cannot identity-map {top_gpa:#x} bytes (limit {MAX_IDENTITY_MAP:#x})")
    return (top_gpa + GIB - 1) // GIB


def identity_page_tables(base_gpa: int, top_gpa: int) -> bytes:
    """PML4 at `base_gpa`, one PDPT, then page directories of 2 MiB pages mapping
    [0, top_gpa) (rounded up to 1 GiB) one-to-one. Returns the bytes to place at
    `base_gpa`; CR3 is `base_gpa`."""
    if base_gpa % PAGE:
        raise ValueError("page tables must be page aligned")
    n_pd = _pd_count(top_gpa)
    pdpt_gpa = base_gpa + PAGE
    pml4 = struct.pack("<Q", pdpt_gpa | TABLE_FLAGS).ljust(PAGE, b"\0")
    pdpt = b"".join(
        struct.pack("<Q", (pdpt_gpa + PAGE * (1 + i)) | TABLE_FLAGS) for i in range(n_pd)
    ).ljust(PAGE, b"\0")
    pds = b"".join(struct.pack("<Q", (i * (2 << 20)) | LEAF_2M_FLAGS) for i in range(512 * n_pd))
    return pml4 + pdpt + pds


def flat_segment(selector: int, type_: int, long: int, db: int) -> kvm_segment:
    """A present CPL0 code or data segment covering all 4 GiB (64-bit: the whole space)."""
    return kvm_segment(
        base=0,
        limit=0xFFFFFFFF,
        selector=selector,
        type=type_,
        present=1,
        dpl=0,
        db=db,
        s=1,
        l=long,
        g=1,
    )


def long_mode_sregs(
    sregs: kvm_sregs,
    gdt_gpa: int,
    cr3: int,
    *,
    code_selector: int = SELECTOR_CODE64,
    data_selector: int = SELECTOR_DATA,
    gdt_limit: int = len(GDT) - 1,
    tr: kvm_segment | None = None,
) -> kvm_sregs:
    """Fill `sregs` for flat 64-bit CPL0 execution with paging at `cr3`. The defaults fit
    `GDT`; another GDT passes its selectors, limit and task register."""
    sregs.cs = flat_segment(code_selector, 0xB, long=1, db=0)
    data = flat_segment(data_selector, 0x3, long=0, db=1)
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data
    if tr is None:
        tr = kvm_segment(base=0, limit=0xFFFF, selector=0, type=0xB, present=1)
    sregs.tr = tr
    sregs.ldt = kvm_segment(base=0, limit=0xFFFF, selector=0, type=0x2, present=1)
    sregs.gdt.base = gdt_gpa
    sregs.gdt.limit = gdt_limit
    sregs.idt.base = 0
    sregs.idt.limit = 0
    sregs.cr0 = LONG_MODE_CR0
    sregs.cr3 = cr3
    sregs.cr4 = LONG_MODE_CR4
    sregs.efer = LONG_MODE_EFER
    return sregs


def long_mode_regs(entry: int, stack_top: int, **gprs: int) -> kvm_regs:
    """RIP at `entry`, RSP at `stack_top`, RFLAGS with only the reserved bit, and any
    general-purpose registers given by name (rdi=..., rsi=...)."""
    regs = kvm_regs(rip=entry, rsp=stack_top, rflags=0x2)
    for name, value in gprs.items():
        setattr(regs, name, value)
    return regs
