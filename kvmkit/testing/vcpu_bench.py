"""The vCPU test bench: vCPU creation limits, and that every piece of vCPU state a VMM
saves and restores (registers, special registers, MSRs, CPUID, events, debug
registers, XSAVE, MP state) reads back as written, and that a guest sees it.
"""

import contextlib
import tempfile
from collections.abc import Iterator

from kvmkit.hostcheck.probes import run_with_timeout
from kvmkit.kvm import Kvm, Vcpu, Vm
from kvmkit.testing.checks import Check, outcome
from kvmkit.testing.harness import build_asm, built_machine
from kvmkit.uapi.caps import Cap
from kvmkit.uapi.cpu import KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_SINGLESTEP, KVM_MP_STATE_RUNNABLE
from kvmkit.uapi.exits import ExitReason

SYSENTER_MSRS = {0x174: 0x10, 0x175: 0xFFFF800000001000, 0x176: 0xFFFF800000002000}
KERNEL_GS_BASE = 0xC0000102


@contextlib.contextmanager
def new_vcpu() -> Iterator[tuple[Vm, Vcpu]]:
    with Kvm() as kvm, kvm.create_vm() as vm:
        yield vm, vm.create_vcpu(0)


def duplicate_id() -> str:
    with new_vcpu() as (vm, _):
        return outcome(lambda: vm.create_vcpu(0))


def id_above_limit() -> str:
    with new_vcpu() as (vm, _):
        limit = vm.check_extension(Cap.MAX_VCPU_ID) or vm.check_extension(Cap.MAX_VCPUS)
        return outcome(lambda: vm.create_vcpu(limit))


def regs_roundtrip() -> str:
    with new_vcpu() as (_, vcpu):
        regs = vcpu.get_regs()
        names = [n for n, *_ in type(regs)._fields_ if n not in ("rip", "rflags")]
        for i, name in enumerate(names):
            setattr(regs, name, 0x1111111111111111 * (i % 15 + 1))
        vcpu.set_regs(regs)
        back = vcpu.get_regs()
        wrong = [n for n in names if getattr(back, n) != getattr(regs, n)]
        return "ok" if not wrong else f"differs: {', '.join(wrong)}"


def sregs_roundtrip() -> str:
    with new_vcpu() as (_, vcpu):
        sregs = vcpu.get_sregs()
        sregs.cr2, sregs.cr8 = 0xDEAD000, 0x3
        vcpu.set_sregs(sregs)
        back = vcpu.get_sregs()
        return "ok" if (back.cr2, back.cr8) == (0xDEAD000, 0x3) else "differs"


def msrs_roundtrip() -> str:
    with new_vcpu() as (_, vcpu):
        values = {**SYSENTER_MSRS, KERNEL_GS_BASE: 0xFFFF888000000000}
        vcpu.set_msrs(values)
        back = vcpu.get_msrs(list(values))
        wrong = [f"{i:#x}" for i in values if back.get(i) != values[i]]
        return "ok" if not wrong else f"differs: {', '.join(wrong)}"


def cpuid_roundtrip() -> str:
    with Kvm() as kvm, kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        supported = kvm.supported_cpuid()
        vcpu.set_cpuid(supported)
        back = {(e.function, e.index) for e in vcpu.get_cpuid()}
        dropped = sorted({e.function for e in supported if (e.function, e.index) not in back})
        return "ok" if not dropped else "leaves dropped: " + ", ".join(map(hex, dropped))


def events_roundtrip() -> str:
    with new_vcpu() as (_, vcpu):
        events = vcpu.get_vcpu_events()
        events.nmi.pending = 1
        events.flags |= 0x1  # KVM_VCPUEVENT_VALID_NMI_PENDING
        vcpu.set_vcpu_events(events)
        return "ok" if vcpu.get_vcpu_events().nmi.pending == 1 else "NMI not pending"


def debugregs_roundtrip() -> str:
    with new_vcpu() as (_, vcpu):
        regs = vcpu.get_debugregs()
        for i in range(4):
            regs.db[i] = 0x1000 * (i + 1)
        vcpu.set_debugregs(regs)
        back = vcpu.get_debugregs()
        return "ok" if list(back.db) == [0x1000, 0x2000, 0x3000, 0x4000] else "differs"


def xsave_roundtrip() -> str:
    with new_vcpu() as (vm, vcpu):
        if not vm.check_extension(Cap.XSAVE):
            return outcome(lambda: vcpu.set_fpu(vcpu.get_fpu()))
        state = vcpu.get_xsave()
        vcpu.set_xsave(state)
        return "ok" if bytes(vcpu.get_xsave()) == bytes(state) else "differs"


def mp_state_initial() -> str:
    with new_vcpu() as (_, vcpu):
        state = vcpu.get_mp_state()
        return "RUNNABLE" if state == KVM_MP_STATE_RUNNABLE else f"state {state}"


def guest_sees_registers() -> str:
    """A register the VMM set is what the guest computes with."""
    source = "mov rax, rbx\nadd rax, 1\nmov dx, 0x3000\nout dx, eax\nhlt\n"
    with tempfile.TemporaryDirectory(prefix="kvmkit-vcpu-") as tmp:
        with built_machine(build_asm(source, tmp), memory="16M") as machine:
            vcpu = machine.vcpus[0]
            regs = vcpu.get_regs()
            regs.rbx = 0x41
            vcpu.set_regs(regs)
            if run_with_timeout(vcpu) != ExitReason.IO:
                return "no IO exit"
            io = vcpu.run_struct.exit.io
            value = int.from_bytes(vcpu.run_page[io.data_offset : io.data_offset + 4], "little")
            return f"guest wrote {value:#x}"


def single_step() -> str:
    """KVM_SET_GUEST_DEBUG single-step: one instruction, then KVM_EXIT_DEBUG."""
    with tempfile.TemporaryDirectory(prefix="kvmkit-vcpu-") as tmp:
        with built_machine(build_asm("nop\nnop\nhlt\n", tmp), memory="16M") as machine:
            vcpu = machine.vcpus[0]
            start = vcpu.get_regs().rip
            vcpu.set_guest_debug(KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP)
            reason = run_with_timeout(vcpu)
            if reason != ExitReason.DEBUG:
                return ExitReason.name_of(reason)
            return f"DEBUG after {vcpu.get_regs().rip - start} byte(s)"


CHECKS: list[Check] = [
    Check(
        "create.duplicate_id", "a second vCPU with the same id is refused", "EEXIST", duplicate_id
    ),
    Check(
        "create.id_limit", "a vCPU id at KVM_CAP_MAX_VCPU_ID is refused", "EINVAL", id_above_limit
    ),
    Check("state.regs", "general registers read back as written", "ok", regs_roundtrip),
    Check("state.sregs", "CR2 and CR8 read back as written", "ok", sregs_roundtrip),
    Check("state.msrs", "SYSENTER and KERNEL_GS_BASE MSRs read back", "ok", msrs_roundtrip),
    Check(
        "state.cpuid",
        "the supported CPUID set reads back whole",
        "ok",
        cpuid_roundtrip,
        deviation=(
            "leaves dropped: 0x1d, 0x1e, 0x24",
            "measured on a PVM host: KVM_SET_CPUID2 keeps every leaf but the AMX tile"
            " leaves (0x1d, 0x1e) and AVX10 (0x24), which KVM_GET_SUPPORTED_CPUID offers",
        ),
    ),
    Check(
        "state.events", "a pending NMI set through vCPU events reads back", "ok", events_roundtrip
    ),
    Check("state.debugregs", "DR0-DR3 read back as written", "ok", debugregs_roundtrip),
    Check("state.xsave", "XSAVE state round-trips byte for byte", "ok", xsave_roundtrip),
    Check("state.mp_state", "a new vCPU is runnable", "RUNNABLE", mp_state_initial),
    Check(
        "guest.registers",
        "the guest computes with a register the VMM set",
        "guest wrote 0x42",
        guest_sees_registers,
    ),
    Check(
        "guest.single_step",
        "single-step stops after one instruction (the entry's 3-byte mov r15, rdi)",
        "DEBUG after 3 byte(s)",
        single_step,
    ),
]
