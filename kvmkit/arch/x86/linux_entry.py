"""vCPU state for entering a Linux kernel, and the GDT and page tables that state needs.

Two entries (a pure module: it builds bytes and ctypes structures, the caller writes
the bytes through guest RAM and sets the registers):

- PVH (include/xen/interface/hvm/start_info.h, arch/x86/platform/pvh/head.S): 32-bit
  protected mode, paging off; CS a flat 32-bit code segment, DS/ES/SS flat data, TR a
  32-bit TSS with base 0 and limit 0x67, CR0 = PE (ET reads 1 on every CPU), CR4 = 0,
  EFLAGS with IF, TF and VM clear, EBX = the hvm_start_info address.
- The 64-bit boot protocol (Documentation/arch/x86/boot.rst): 64-bit mode with paging
  on and the kernel, zero page and command line identity mapped (kvmkit maps all of
  [0, 4 GiB) with 2 MiB pages, U=1 in every entry as PVM hosts need); a GDT with flat
  __BOOT_CS (0x10, execute/read) and __BOOT_DS (0x18, read/write), CS = __BOOT_CS,
  DS/ES/SS = __BOOT_DS; interrupts off; RSI = the zero page address. RSP points to a
  small boot stack, since the bzImage entry pushes before it sets its own.
"""

import struct
from dataclasses import dataclass, field

from kvmkit.arch.x86.long_mode import (
    CODE32_DESCRIPTOR,
    CODE64_DESCRIPTOR,
    CR0_ET,
    CR0_PE,
    DATA_DESCRIPTOR,
    GIB,
    flat_segment,
    identity_page_tables,
    long_mode_sregs,
)
from kvmkit.uapi.cpu import kvm_regs, kvm_segment, kvm_sregs

BOOT_CS = 0x10
BOOT_DS = 0x18
BOOT_TSS = 0x20
TSS_LIMIT = 0x67
TSS_BUSY_TYPE = 0xB  # 32-bit busy TSS; the same type means a 64-bit TSS in long mode
RFLAGS_RESERVED = 0x2  # bit 1 is always set; IF, TF, VM and the rest clear
PVH_CR0 = CR0_PE | CR0_ET
IDENTITY_MAP_BYTES = 4 * GIB


def tss_descriptor(base: int = 0, limit: int = TSS_LIMIT) -> int:
    """Low 8 bytes of a present, busy TSS descriptor (DPL 0, byte granular)."""
    access = 0x80 | TSS_BUSY_TYPE  # P=1, DPL=0, S=0
    return (
        (limit & 0xFFFF)
        | (base & 0xFFFFFF) << 16
        | access << 40
        | ((limit >> 16) & 0xF) << 48
        | ((base >> 24) & 0xFF) << 56
    )


def pvh_gdt() -> bytes:
    """null, null, 0x10 flat 32-bit code, 0x18 flat data, 0x20 32-bit TSS."""
    return struct.pack("<5Q", 0, 0, CODE32_DESCRIPTOR, DATA_DESCRIPTOR, tss_descriptor())


def boot64_gdt() -> bytes:
    """null, null, 0x10 64-bit code, 0x18 flat data, 0x20 64-bit TSS (16 bytes)."""
    return struct.pack("<6Q", 0, 0, CODE64_DESCRIPTOR, DATA_DESCRIPTOR, tss_descriptor(), 0)


def _tss_register() -> kvm_segment:
    return kvm_segment(base=0, limit=TSS_LIMIT, selector=BOOT_TSS, type=TSS_BUSY_TYPE, present=1)


def pvh_sregs(sregs: kvm_sregs, gdt_gpa: int) -> kvm_sregs:
    """Fill `sregs` for the PVH entry: flat 32-bit protected mode, no paging."""
    sregs.cs = flat_segment(BOOT_CS, 0xB, long=0, db=1)
    data = flat_segment(BOOT_DS, 0x3, long=0, db=1)
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data
    sregs.tr = _tss_register()
    sregs.ldt = kvm_segment(base=0, limit=0xFFFF, selector=0, type=0x2, present=1)
    sregs.gdt.base = gdt_gpa
    sregs.gdt.limit = len(pvh_gdt()) - 1
    sregs.idt.base = 0
    sregs.idt.limit = 0
    sregs.cr0 = PVH_CR0
    sregs.cr3 = 0
    sregs.cr4 = 0
    sregs.efer = 0
    return sregs


def boot64_sregs(sregs: kvm_sregs, gdt_gpa: int, cr3: int) -> kvm_sregs:
    """Fill `sregs` for the 64-bit boot protocol: long mode, paging at `cr3`,
    CS = __BOOT_CS, data segments = __BOOT_DS."""
    return long_mode_sregs(
        sregs,
        gdt_gpa,
        cr3,
        code_selector=BOOT_CS,
        data_selector=BOOT_DS,
        gdt_limit=len(boot64_gdt()) - 1,
        tr=_tss_register(),
    )


@dataclass
class LinuxEntry:
    """What the VMM does before the first KVM_RUN of the boot vCPU: write each
    (gpa, bytes) in `writes` into guest RAM, set `regs`, and set the special registers
    with `fill_sregs(vcpu.get_sregs())` (which keeps APIC base and the interrupt bitmap)."""

    protocol: str  # "pvh" | "boot64"
    regs: kvm_regs
    gdt_gpa: int
    cr3: int = 0
    writes: list[tuple[int, bytes]] = field(default_factory=list)

    def fill_sregs(self, sregs: kvm_sregs) -> kvm_sregs:
        if self.protocol == "pvh":
            return pvh_sregs(sregs, self.gdt_gpa)
        return boot64_sregs(sregs, self.gdt_gpa, self.cr3)


def pvh_entry(entry: int, start_info_gpa: int, gdt_gpa: int) -> LinuxEntry:
    if entry >> 32 or start_info_gpa >> 32:
        raise ValueError("the PVH entry and start_info must be below 4 GiB")
    regs = kvm_regs(rip=entry, rbx=start_info_gpa, rflags=RFLAGS_RESERVED)
    return LinuxEntry("pvh", regs, gdt_gpa, writes=[(gdt_gpa, pvh_gdt())])


def boot64_entry(
    entry: int, zero_page_gpa: int, gdt_gpa: int, page_tables_gpa: int, stack_top: int
) -> LinuxEntry:
    regs = kvm_regs(rip=entry, rsi=zero_page_gpa, rsp=stack_top, rflags=RFLAGS_RESERVED)
    tables = identity_page_tables(page_tables_gpa, IDENTITY_MAP_BYTES)
    return LinuxEntry(
        "boot64",
        regs,
        gdt_gpa,
        cr3=page_tables_gpa,
        writes=[(gdt_gpa, boot64_gdt()), (page_tables_gpa, tables)],
    )


def linux_entry(
    protocol: str,
    entry: int,
    boot_info_gpa: int,
    gdt_gpa: int,
    page_tables_gpa: int | None = None,
    stack_top: int | None = None,
) -> LinuxEntry:
    """The entry for a loader's plan: `linux_entry(plan.protocol, plan.entry,
    plan.boot_info_gpa, plan.gdt_gpa, plan.page_tables_gpa, plan.stack_top)`."""
    if protocol == "pvh":
        return pvh_entry(entry, boot_info_gpa, gdt_gpa)
    if protocol == "boot64":
        if page_tables_gpa is None or stack_top is None:
            raise ValueError("the 64-bit entry needs page tables and a stack")
        return boot64_entry(entry, boot_info_gpa, gdt_gpa, page_tables_gpa, stack_top)
    raise ValueError(f"unknown Linux entry protocol {protocol!r}")
