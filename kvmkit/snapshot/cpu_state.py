"""Per-vCPU and per-VM KVM state: read from a stopped VM, written into a new one.

Each piece is the raw bytes of its 6.18 uAPI structure, keyed by name, so a reader
checks sizes before anything reaches an ioctl. Only pieces the host and machine have
are captured (no lapic without an in-kernel irqchip); the restore applies what it
finds, in an order KVM accepts: CPUID before anything else, special registers before
general ones and MSRs, the lapic before MSRs (TSC deadline), events and mp_state last.
"""

import ctypes
import errno
import struct
from typing import TypeVar

from kvmkit.kvm import KvmError, Vcpu, Vm
from kvmkit.snapshot.format import StreamFormatError
from kvmkit.uapi.caps import Cap
from kvmkit.uapi.cpu import (
    kvm_cpuid_entry2,
    kvm_debugregs,
    kvm_fpu,
    kvm_lapic_state,
    kvm_regs,
    kvm_sregs,
    kvm_vcpu_events,
    kvm_xcrs,
    kvm_xsave,
)
from kvmkit.uapi.irq import (
    KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
    kvm_clock_data,
    kvm_irqchip,
    kvm_pit_state2,
)

_MSR = struct.Struct("<IQ")
_U32 = struct.Struct("<I")
IRQCHIPS = {
    "pic_master": KVM_IRQCHIP_PIC_MASTER,
    "pic_slave": KVM_IRQCHIP_PIC_SLAVE,
    "ioapic": KVM_IRQCHIP_IOAPIC,
}

# name -> the structure its bytes hold; a restore checks each size against it.
VCPU_STRUCTS: dict[str, type[ctypes.Structure]] = {
    "regs": kvm_regs,
    "sregs": kvm_sregs,
    "fpu": kvm_fpu,
    "xsave": kvm_xsave,
    "xcrs": kvm_xcrs,
    "lapic": kvm_lapic_state,
    "events": kvm_vcpu_events,
    "debugregs": kvm_debugregs,
}
VM_STRUCTS: dict[str, type[ctypes.Structure]] = {
    "clock": kvm_clock_data,
    "pit2": kvm_pit_state2,
    **dict.fromkeys(IRQCHIPS, kvm_irqchip),
}


def readable_msrs(vcpu: Vcpu, indices: list[int]) -> list[int]:
    """The MSRs of KVM_GET_MSR_INDEX_LIST that this vCPU actually reads back."""
    ok = []
    for index in indices:
        try:
            vcpu.get_msrs([index])
        except KvmError:
            continue
        ok.append(index)
    return ok


def capture_vcpu(vcpu: Vcpu, msrs: list[int], irqchip: bool) -> dict[str, bytes]:
    """Everything KVM holds for one vCPU. The vCPU must not be inside KVM_RUN and must
    have no exit pending (run it once with immediate_exit first)."""
    vm = vcpu.vm
    state: dict[str, bytes] = {
        "cpuid": b"".join(bytes(e) for e in vcpu.get_cpuid()),
        "regs": bytes(vcpu.get_regs()),
        "sregs": bytes(vcpu.get_sregs()),
    }
    if vm.check_extension(Cap.XSAVE):
        state["xsave"] = bytes(vcpu.get_xsave())
    else:
        state["fpu"] = bytes(vcpu.get_fpu())
    if vm.check_extension(Cap.XCRS):
        state["xcrs"] = bytes(vcpu.get_xcrs())
    if irqchip:
        state["lapic"] = bytes(vcpu.get_lapic())
    state["msrs"] = b"".join(_MSR.pack(i, v) for i, v in vcpu.get_msrs(msrs).items())
    if vm.check_extension(Cap.VCPU_EVENTS):
        state["events"] = bytes(vcpu.get_vcpu_events())
    if vm.check_extension(Cap.MP_STATE):
        state["mp_state"] = _U32.pack(vcpu.get_mp_state())
    if vm.check_extension(Cap.DEBUGREGS):
        state["debugregs"] = bytes(vcpu.get_debugregs())
    return state


S = TypeVar("S", bound=ctypes.Structure)


def _struct(state: dict[str, bytes], name: str, label: str, cls: type[S]) -> S:
    """Item `name` as a `cls`, its size checked (the tables above name each item's)."""
    assert (VCPU_STRUCTS.get(name) or VM_STRUCTS[name]) is cls
    data = state[name]
    if len(data) != ctypes.sizeof(cls):
        raise StreamFormatError(
            f"{label}: {name} is {len(data)} bytes, but {cls.__name__} is"
            f" {ctypes.sizeof(cls)} on this kvmkit"
        )
    return cls.from_buffer_copy(data)


def apply_vcpu(vcpu: Vcpu, state: dict[str, bytes], label: str) -> None:
    """Load a `capture_vcpu` result into a fresh vCPU."""
    for required in ("cpuid", "regs", "sregs", "msrs"):
        if required not in state:
            raise StreamFormatError(f"{label}: {required} is missing")
    size = ctypes.sizeof(kvm_cpuid_entry2)
    cpuid = state["cpuid"]
    if len(cpuid) % size:
        raise StreamFormatError(f"{label}: cpuid is not a whole number of entries")
    vcpu.set_cpuid(
        [kvm_cpuid_entry2.from_buffer_copy(cpuid, i) for i in range(0, len(cpuid), size)]
    )
    vcpu.set_sregs(_struct(state, "sregs", label, kvm_sregs))
    vcpu.set_regs(_struct(state, "regs", label, kvm_regs))
    if "xsave" in state:
        vcpu.set_xsave(_struct(state, "xsave", label, kvm_xsave))
    elif "fpu" in state:
        vcpu.set_fpu(_struct(state, "fpu", label, kvm_fpu))
    if "xcrs" in state:
        vcpu.set_xcrs(_struct(state, "xcrs", label, kvm_xcrs))
    if "lapic" in state:
        vcpu.set_lapic(_struct(state, "lapic", label, kvm_lapic_state))
    raw = state["msrs"]
    if len(raw) % _MSR.size:
        raise StreamFormatError(f"{label}: msrs is not a whole number of entries")
    saved = dict(_MSR.iter_unpack(raw))
    # Set only what differs from a fresh vCPU: some MSRs read back but refuse even their
    # reset value without the feature behind them (MSR_KVM_ASYNC_PF_INT without an
    # in-kernel lapic), and rewriting an unchanged MSR gains nothing.
    fresh = vcpu.get_msrs(list(saved))
    msrs = {index: value for index, value in saved.items() if fresh.get(index) != value}
    try:
        if msrs:
            vcpu.set_msrs(msrs)
    except KvmError as e:
        raise KvmError(
            "KVM_SET_MSRS", e.errno or errno.EINVAL, f"{label}: {e.hint or 'an MSR was refused'}"
        ) from None
    if "events" in state:
        vcpu.set_vcpu_events(_struct(state, "events", label, kvm_vcpu_events))
    if "mp_state" in state:
        vcpu.set_mp_state(_U32.unpack(state["mp_state"])[0])
    if "debugregs" in state:
        vcpu.set_debugregs(_struct(state, "debugregs", label, kvm_debugregs))


def capture_vm(vm: Vm, irqchip: bool, pit: bool) -> dict[str, bytes]:
    state: dict[str, bytes] = {}
    if vm.check_extension(Cap.ADJUST_CLOCK):
        state["clock"] = bytes(vm.get_clock())
    if irqchip:
        for name, chip in IRQCHIPS.items():
            state[name] = bytes(vm.get_irqchip(chip))
    if pit:
        state["pit2"] = bytes(vm.get_pit2())
    return state


def apply_vm(vm: Vm, state: dict[str, bytes], label: str) -> None:
    for name in IRQCHIPS:
        if name in state:
            vm.set_irqchip(_struct(state, name, label, kvm_irqchip))
    if "pit2" in state:
        vm.set_pit2(_struct(state, "pit2", label, kvm_pit_state2))
    if "clock" in state:
        clock = _struct(state, "clock", label, kvm_clock_data)
        # Continue the guest's clock from the saved value; the host-specific
        # realtime/host_tsc pairs do not carry over to another process or host.
        vm.set_clock(kvm_clock_data(clock=clock.clock))
