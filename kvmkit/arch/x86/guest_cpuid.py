"""CPUID for a Linux guest: what KVM supports, shaped into one coherent machine.

- Leaf 1: this vCPU's initial APIC id, the logical processor count (HTT with more
  than one vCPU), the hypervisor bit.
- Leaves 0xB and 0x1F: a topology of one package with `nr_vcpus` cores, one thread
  each, x2APIC id = the vCPU index.
- Leaf 4: the cores-per-package field matching that topology.
- `hide`: feature names (kvmkit/arch/x86/cpuid_features.py) cleared everywhere they
  appear; clearing xsave clears osxsave too. On a PVM host kvmkit hides what this
  host's instruction emulator cannot run at CPL 0 (`PVM_HIDDEN`), so a guest that
  believes its CPUID never reaches for it.
KVM's own leaves (0x40000000-) stay as KVM reports them: they are what it honours.
"""

from kvmkit.arch.x86.cpuid_features import FEATURE_BITS
from kvmkit.uapi.cpu import kvm_cpuid_entry2

LEAF_FEATURES = 0x1
LEAF_CACHE = 0x4
LEAF_EXT_TOPOLOGY = 0xB
LEAF_V2_EXT_TOPOLOGY = 0x1F
HYPERVISOR_BIT = 1 << 31
HTT_BIT = 1 << 28
LEVEL_SMT, LEVEL_CORE = 1, 2

# Measured on PVM hosts (the emulator stops with an internal error): XRSTOR in FPU
# set-up, POPCNT in the hweight alternatives, CLAC with SMAP. ERMS and FSRM make
# clear_page and memcpy use byte-wise `rep stos/movs`, which the emulator pays for
# per byte (a page fault 10.5 ms -> 4.1 ms without them).
PVM_HIDDEN = ("xsave", "popcnt", "smap", "erms", "fsrm")

_BY_NAME = {name: (key, bit) for key, bits in FEATURE_BITS.items() for bit, name in bits.items()}


def feature_location(name: str) -> tuple[tuple[int, int, str], int]:
    """(leaf, subleaf, register), bit of a named feature; KeyError if unknown."""
    return _BY_NAME[name]


def _shift_for(count: int) -> int:
    """Bits of x2APIC id that count `count` things (the next power of two)."""
    return max(0, (count - 1).bit_length())


def linux_cpuid(
    supported: list[kvm_cpuid_entry2], index: int, nr_vcpus: int, hide: tuple[str, ...] = ()
) -> list[kvm_cpuid_entry2]:
    clear: dict[tuple[int, int, str], int] = {}
    names = set(hide) | ({"osxsave"} if "xsave" in hide else set())
    for name in names:
        key, bit = feature_location(name)
        clear[key] = clear.get(key, 0) | 1 << bit
    core_shift = _shift_for(nr_vcpus)
    out = []
    for src in supported:
        e = kvm_cpuid_entry2.from_buffer_copy(src)
        for reg in ("eax", "ebx", "ecx", "edx"):
            mask = clear.get((e.function, e.index, reg))
            if mask:
                setattr(e, reg, getattr(e, reg) & ~mask)
        if e.function == LEAF_FEATURES:
            e.ebx = (e.ebx & 0x0000FFFF) | (index & 0xFF) << 24 | (1 << core_shift & 0xFF) << 16
            e.ecx |= HYPERVISOR_BIT
            e.edx = e.edx | HTT_BIT if nr_vcpus > 1 else e.edx & ~HTT_BIT
        elif e.function == LEAF_CACHE:
            e.eax = (e.eax & 0x03FFFFFF) | ((1 << core_shift) - 1) << 26
        elif e.function in (LEAF_EXT_TOPOLOGY, LEAF_V2_EXT_TOPOLOGY):
            if e.index == 0:  # SMT: one thread per core
                e.eax, e.ebx, e.ecx = 0, 1, LEVEL_SMT << 8
            elif e.index == 1:  # cores in the package
                e.eax, e.ebx, e.ecx = core_shift, nr_vcpus, LEVEL_CORE << 8 | 1
            else:
                e.eax, e.ebx, e.ecx = 0, 0, e.index
            e.edx = index
        out.append(e)
    return out
