"""LAPIC register set-up as a PC firmware leaves it: LINT0 in ExtINT mode (the PIC's
output), LINT1 in NMI mode. Operates on the 1 KiB register page of kvm_lapic_state."""

import struct

from kvmkit.uapi.cpu import kvm_lapic_state

APIC_LVT0 = 0x350
APIC_LVT1 = 0x360
DELIVERY_EXTINT = 0x7 << 8
DELIVERY_NMI = 0x4 << 8
LVT_MASKED = 1 << 16
_U32 = struct.Struct("<I")


def read_reg(state: kvm_lapic_state, offset: int) -> int:
    # bytes(state), not state.regs: ctypes cuts a c_char array at its first NUL
    value: int = _U32.unpack_from(bytes(state), offset)[0]
    return value


def with_bios_lints(state: kvm_lapic_state) -> kvm_lapic_state:
    """A copy of `state` with LINT0 = ExtINT and LINT1 = NMI, both unmasked."""
    regs = bytearray(bytes(state))
    for offset, mode in ((APIC_LVT0, DELIVERY_EXTINT), (APIC_LVT1, DELIVERY_NMI)):
        value = _U32.unpack_from(regs, offset)[0]
        value = (value & ~(LVT_MASKED | 0x700)) | mode
        _U32.pack_into(regs, offset, value)
    return kvm_lapic_state.from_buffer_copy(regs)
