"""Booting Linux on a machine: the kernel and initrd through kvmkit/loader, an MP table
for the vCPUs and interrupt lines, CPUID shaped for a guest, the LAPIC and FPU as a
PC firmware leaves them, the entry state (PVH or the 64-bit boot protocol), the
command line kvmkit adds, and what the kernel says on its console about how it ends.
"""

import re
from pathlib import Path

from kvmkit.arch.x86.guest_cpuid import PVM_HIDDEN, linux_cpuid
from kvmkit.arch.x86.lapic import with_bios_lints
from kvmkit.arch.x86.linux_entry import linux_entry
from kvmkit.arch.x86.mptable import build_mptable
from kvmkit.kvm import KvmError, Vcpu
from kvmkit.loader.addresses import MPTABLE_GPA
from kvmkit.loader.linux import LinuxBootPlan, load_linux
from kvmkit.machine.resources import LinuxBoot
from kvmkit.memory import GuestMemory
from kvmkit.uapi.cpu import kvm_cpuid_entry2, kvm_fpu

FCW_DEFAULT = 0x37F  # x87 control word after FNINIT
MXCSR_DEFAULT = 0x1F80  # all SSE exceptions masked
XSAVE_BIT = 1 << 26  # CPUID leaf 1 ECX
MSR_IA32_MISC_ENABLE = 0x1A0
MISC_ENABLE_FAST_STRINGS = 1 << 0

_PARAM_RE = re.compile(r"(?:^|\s)([\w.-]+)(?:=|\s|$)")


def cmdline_params(cmdline: str) -> set[str]:
    """The parameter names on a kernel command line (`a=b c` -> {"a", "c"})."""
    return set(_PARAM_RE.findall(cmdline))


def compose_cmdline(user: str, tsc_khz: int | None, extra: list[str] | None = None) -> str:
    """The guest's command line: the user's, then what kvmkit adds unless the user set
    it: the TSC frequency (Linux otherwise calibrates against the PIT, which fails
    under emulation and marks the TSC unstable) and `extra` (features the guest must
    leave alone on this host, virtio-mmio devices)."""
    have = cmdline_params(user)
    parts = [user.strip()] if user.strip() else []
    if tsc_khz and "tsc_early_khz" not in have:
        parts.append(f"tsc_early_khz={tsc_khz}")
    parts += [p for p in extra or [] if p.split("=", 1)[0] not in have]
    return " ".join(parts)


def guest_cpuid_params(
    vcpu: Vcpu, supported: list[kvm_cpuid_entry2], hide: tuple[str, ...]
) -> list[str]:
    """Command-line parameters that keep a guest off the features in `hide`, for a host
    whose KVM does not let the VMM hide them: PVM hosts answer CPUID from the CPU
    itself, whatever KVM_SET_CPUID2 said (measured: leaf 1 reads back unchanged). Empty
    when the VMM's CPUID is honoured (then it hides them) or nothing is to be hidden."""
    if not hide:
        return []
    vcpu.set_cpuid(linux_cpuid(supported, vcpu.index, 1, hide))
    leaf1 = next((e for e in vcpu.get_cpuid() if e.function == 1), None)
    if leaf1 is None or not leaf1.ecx & XSAVE_BIT:
        return []
    return ["noxsave", "clearcpuid=" + ",".join(h for h in hide if h != "xsave")]


def load(
    memory: GuestMemory,
    boot: LinuxBoot,
    nr_vcpus: int,
    tsc_khz: int | None,
    irqs: list[int],
    extra: list[str],
) -> LinuxBootPlan:
    """Load the kernel, initrd and command line (with `extra` parameters), and the MP
    table (vCPUs, the IOAPIC and every device interrupt line in `irqs`)."""
    cmdline = compose_cmdline(boot.cmdline, tsc_khz, extra)
    initrd = Path(boot.initrd) if boot.initrd is not None else None
    plan = load_linux(
        memory, Path(boot.kernel), initrd=initrd, cmdline=cmdline, protocol=boot.protocol
    )
    memory.write(
        MPTABLE_GPA, build_mptable(nr_vcpus, MPTABLE_GPA, ioapic_id=nr_vcpus, extra_irqs=irqs)
    )
    return plan


def setup_vcpu(
    vcpu: Vcpu,
    plan: LinuxBootPlan,
    supported: list[kvm_cpuid_entry2],
    nr_vcpus: int,
    pvm_host: bool,
    irqchip: bool,
    memory: GuestMemory,
) -> None:
    """CPUID, FPU, LAPIC and (the boot vCPU) the entry state; the others wait for the
    boot vCPU's INIT/SIPI, as on a PC."""
    hide = PVM_HIDDEN if pvm_host else ()
    vcpu.set_cpuid(linux_cpuid(supported, vcpu.index, nr_vcpus, hide))
    fpu = kvm_fpu()
    fpu.fcw = FCW_DEFAULT
    fpu.mxcsr = MXCSR_DEFAULT
    vcpu.set_fpu(fpu)
    try:
        misc = vcpu.get_msrs([MSR_IA32_MISC_ENABLE])[MSR_IA32_MISC_ENABLE]
        vcpu.set_msrs({MSR_IA32_MISC_ENABLE: misc | MISC_ENABLE_FAST_STRINGS})
    except KvmError:
        pass  # a host without the MSR: Linux copes
    if irqchip:
        vcpu.set_lapic(with_bios_lints(vcpu.get_lapic()))
    if vcpu.index != 0:
        return
    entry = linux_entry(
        plan.protocol,
        plan.entry,
        plan.boot_info_gpa,
        plan.gdt_gpa,
        plan.page_tables_gpa,
        plan.stack_top,
    )
    for gpa, data in entry.writes:
        memory.write(gpa, data)
    vcpu.set_sregs(entry.fill_sregs(vcpu.get_sregs()))
    vcpu.set_regs(entry.regs)
