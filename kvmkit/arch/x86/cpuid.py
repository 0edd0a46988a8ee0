"""The CPUID a vCPU sees: what KVM supports, with this vCPU's APIC id filled in."""

from kvmkit.uapi.cpu import kvm_cpuid_entry2

LEAF_FEATURES = 0x1
LEAF_EXT_TOPOLOGY = 0xB
LEAF_V2_EXT_TOPOLOGY = 0x1F


def vcpu_cpuid(supported: list[kvm_cpuid_entry2], apic_id: int) -> list[kvm_cpuid_entry2]:
    """A copy of `supported` with the initial APIC id of vCPU `apic_id` in leaves 1, 0xB
    and 0x1F."""
    entries = []
    for src in supported:
        e = kvm_cpuid_entry2.from_buffer_copy(src)
        if e.function == LEAF_FEATURES:
            e.ebx = (e.ebx & 0x00FFFFFF) | ((apic_id & 0xFF) << 24)
        elif e.function in (LEAF_EXT_TOPOLOGY, LEAF_V2_EXT_TOPOLOGY):
            e.edx = apic_id
        entries.append(e)
    return entries
