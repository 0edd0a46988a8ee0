"""Human-readable register dumps for crash and error reports."""

from kvmkit.uapi.cpu import kvm_regs, kvm_segment, kvm_sregs

_GPRS = "rax rbx rcx rdx rsi rdi rsp rbp r8 r9 r10 r11 r12 r13 r14 r15".split()


def _seg(name: str, s: kvm_segment) -> str:
    return f"{name}={s.selector:04x} base={s.base:#x} type={s.type} l={s.l} db={s.db}"


def format_registers(regs: kvm_regs, sregs: kvm_sregs | None = None) -> str:
    lines = []
    for i in range(0, len(_GPRS), 4):
        lines.append("  " + "  ".join(f"{n:>3}={getattr(regs, n):016x}" for n in _GPRS[i : i + 4]))
    lines.append(f"  rip={regs.rip:016x}  rflags={regs.rflags:08x}")
    if sregs is not None:
        lines.append(
            f"  cr0={sregs.cr0:08x} cr2={sregs.cr2:x} cr3={sregs.cr3:x} cr4={sregs.cr4:x}"
            f" efer={sregs.efer:x}"
        )
        lines.append(f"  {_seg('cs', sregs.cs)}  {_seg('ss', sregs.ss)}")
    return "\n".join(lines)
