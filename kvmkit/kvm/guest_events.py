"""Delivering a guest-visible fault (`kvmkit.faults.GuestEvent`) to a vCPU.

- Exceptions (#GP, #UD, #PF with an address) go in through KVM_SET_VCPU_EVENTS as an
  injected exception; for #PF, CR2 is set to the address first (KVM_SET_SREGS).
- An NMI goes in through KVM_NMI.
- A machine check goes in through KVM_X86_SET_MCE, after KVM_X86_SETUP_MCE gave the
  vCPU the banks the host supports (KVM_X86_GET_MCE_CAP_SUPPORTED). The guest must
  have set CR4.MCE, or KVM shuts it down (a triple fault), as hardware would.
"""

from typing import TYPE_CHECKING

from kvmkit.faults.guest_events import VECTORS, WITH_ERROR_CODE, GuestEvent
from kvmkit.uapi.cpu import kvm_x86_mce

if TYPE_CHECKING:
    from kvmkit.kvm.vcpu import Vcpu

MCI_STATUS_VAL = 1 << 63
MCI_STATUS_UC = 1 << 61
MCI_STATUS_EN = 1 << 60
MCI_STATUS_ADDRV = 1 << 58
MCG_STATUS_RIPV = 1 << 0
MCE_BANKS = 10
MCG_STATUS_MCIP = 1 << 2


def deliver(vcpu: "Vcpu", event: GuestEvent) -> None:
    """Make `event` happen on `vcpu` at its next KVM_RUN."""
    if event.kind == "NMI":
        vcpu.nmi()
    elif event.kind == "MCE":
        _machine_check(vcpu, event.address)
    else:
        raise_exception(vcpu, event.vector, event.error_code, event.address, event.kind)


def raise_exception(
    vcpu: "Vcpu", vector: int, error_code: int = 0, cr2: int = 0, kind: str = ""
) -> None:
    """Inject exception `vector` (with `error_code` when the vector has one)."""
    if vector == VECTORS["PF"]:
        sregs = vcpu.get_sregs()
        sregs.cr2 = cr2
        vcpu.set_sregs(sregs)
    events = vcpu.get_vcpu_events()
    events.exception.injected = 1
    events.exception.pending = 0
    events.exception.nr = vector
    has_code = kind in WITH_ERROR_CODE or vector in (8, 10, 11, 12, 13, 14, 17, 21)
    events.exception.has_error_code = 1 if has_code else 0
    events.exception.error_code = error_code if has_code else 0
    events.exception_has_payload = 0
    vcpu.set_vcpu_events(events)


def _machine_check(vcpu: "Vcpu", address: int) -> None:
    if not vcpu.mce_ready:
        # KVM reports the MCG_CAP feature bits; the bank count (bits 0-7) is ours to pick.
        vcpu.setup_mce(vcpu.vm.kvm.mce_cap_supported() & ~0xFF | MCE_BANKS)
        vcpu.mce_ready = True
    status = MCI_STATUS_VAL | MCI_STATUS_UC | MCI_STATUS_EN
    if address:
        status |= MCI_STATUS_ADDRV
    vcpu.set_mce(
        kvm_x86_mce(
            status=status, addr=address, mcg_status=MCG_STATUS_MCIP | MCG_STATUS_RIPV, bank=0
        )
    )
