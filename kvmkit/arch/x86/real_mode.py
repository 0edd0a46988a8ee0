"""16-bit real mode: CS:IP at an entry point below 1 MiB."""

from kvmkit.uapi.cpu import kvm_regs, kvm_segment, kvm_sregs

REAL_MODE_LIMIT = 1 << 20


def real_mode_segment(selector: int, type_: int) -> kvm_segment:
    return kvm_segment(
        base=selector << 4, limit=0xFFFF, selector=selector, type=type_, present=1, s=1
    )


def real_mode_sregs(sregs: kvm_sregs, entry: int) -> kvm_sregs:
    """CS = entry's 64 KiB segment, IP = the rest; DS=ES=FS=GS=SS=CS; no paging."""
    selector = (entry >> 16) << 12
    sregs.cs = real_mode_segment(selector, 0xB)
    data = real_mode_segment(selector, 0x3)
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data
    sregs.cr0 = 0x60000010  # CD | NW | ET, the reset value: PE and PG clear
    sregs.cr3 = 0
    sregs.cr4 = 0
    sregs.efer = 0
    return sregs


def real_mode_regs(entry: int) -> kvm_regs:
    return kvm_regs(rip=entry & 0xFFFF, rsp=0xFFFE, rflags=0x2)
