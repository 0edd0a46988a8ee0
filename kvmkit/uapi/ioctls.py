"""KVM ioctl request numbers, computed from the structures they carry.

The fd each one belongs to is in its comment group: system (/dev/kvm), VM, vCPU.
Variable-length structures encode only their header in the number.
"""

from ctypes import c_uint64

from kvmkit.uapi.control import (
    kvm_create_device,
    kvm_device_attr,
    kvm_enable_cap,
    kvm_pmu_event_filter,
    kvm_xen_hvm_config,
)
from kvmkit.uapi.cpu import (
    kvm_cpuid2,
    kvm_debugregs,
    kvm_fpu,
    kvm_guest_debug,
    kvm_interrupt,
    kvm_lapic_state,
    kvm_mp_state,
    kvm_msr_filter,
    kvm_msr_list,
    kvm_msrs,
    kvm_nested_state,
    kvm_one_reg,
    kvm_reg_list,
    kvm_regs,
    kvm_signal_mask,
    kvm_sregs,
    kvm_sregs2,
    kvm_tpr_access_ctl,
    kvm_translation,
    kvm_vapic_addr,
    kvm_vcpu_events,
    kvm_x86_mce,
    kvm_xcrs,
    kvm_xsave,
)
from kvmkit.uapi.ioctl import io, ior, iow, iowr
from kvmkit.uapi.irq import (
    kvm_clock_data,
    kvm_ioeventfd,
    kvm_irq_level,
    kvm_irq_routing,
    kvm_irqchip,
    kvm_irqfd,
    kvm_msi,
    kvm_pit_config,
    kvm_pit_state2,
)
from kvmkit.uapi.memory import (
    kvm_clear_dirty_log,
    kvm_coalesced_mmio_zone,
    kvm_create_guest_memfd,
    kvm_dirty_log,
    kvm_memory_attributes,
    kvm_pre_fault_memory,
    kvm_userspace_memory_region,
    kvm_userspace_memory_region2,
)

KVM_API_VERSION = 12

# system fd
KVM_GET_API_VERSION = io(0x00)
KVM_CREATE_VM = io(0x01)
KVM_GET_MSR_INDEX_LIST = iowr(0x02, kvm_msr_list)
KVM_CHECK_EXTENSION = io(0x03)
KVM_GET_VCPU_MMAP_SIZE = io(0x04)
KVM_GET_SUPPORTED_CPUID = iowr(0x05, kvm_cpuid2)
KVM_GET_EMULATED_CPUID = iowr(0x09, kvm_cpuid2)
KVM_GET_MSR_FEATURE_INDEX_LIST = iowr(0x0A, kvm_msr_list)
KVM_X86_GET_MCE_CAP_SUPPORTED = ior(0x9D, c_uint64)

# VM fd
KVM_CREATE_VCPU = io(0x41)
KVM_GET_DIRTY_LOG = iow(0x42, kvm_dirty_log)
KVM_SET_NR_MMU_PAGES = io(0x44)
KVM_SET_USER_MEMORY_REGION = iow(0x46, kvm_userspace_memory_region)
KVM_SET_TSS_ADDR = io(0x47)
KVM_SET_IDENTITY_MAP_ADDR = iow(0x48, c_uint64)
KVM_SET_USER_MEMORY_REGION2 = iow(0x49, kvm_userspace_memory_region2)
KVM_CREATE_IRQCHIP = io(0x60)
KVM_IRQ_LINE = iow(0x61, kvm_irq_level)
KVM_GET_IRQCHIP = iowr(0x62, kvm_irqchip)
KVM_SET_IRQCHIP = ior(0x63, kvm_irqchip)  # historic _IOR encoding, kept by the kernel
KVM_CREATE_PIT = io(0x64)
KVM_IRQ_LINE_STATUS = iowr(0x67, kvm_irq_level)
KVM_REGISTER_COALESCED_MMIO = iow(0x67, kvm_coalesced_mmio_zone)
KVM_UNREGISTER_COALESCED_MMIO = iow(0x68, kvm_coalesced_mmio_zone)
KVM_SET_GSI_ROUTING = iow(0x6A, kvm_irq_routing)
KVM_REINJECT_CONTROL = io(0x71)
KVM_IRQFD = iow(0x76, kvm_irqfd)
KVM_CREATE_PIT2 = iow(0x77, kvm_pit_config)
KVM_SET_BOOT_CPU_ID = io(0x78)
KVM_IOEVENTFD = iow(0x79, kvm_ioeventfd)
KVM_XEN_HVM_CONFIG = iow(0x7A, kvm_xen_hvm_config)
KVM_SET_CLOCK = iow(0x7B, kvm_clock_data)
KVM_GET_CLOCK = ior(0x7C, kvm_clock_data)
KVM_GET_PIT2 = ior(0x9F, kvm_pit_state2)
KVM_SET_PIT2 = iow(0xA0, kvm_pit_state2)
KVM_SET_TSC_KHZ = io(0xA2)
KVM_GET_TSC_KHZ = io(0xA3)
KVM_SIGNAL_MSI = iow(0xA5, kvm_msi)
KVM_SET_PMU_EVENT_FILTER = iow(0xB2, kvm_pmu_event_filter)
KVM_CLEAR_DIRTY_LOG = iowr(0xC0, kvm_clear_dirty_log)
KVM_X86_SET_MSR_FILTER = iow(0xC6, kvm_msr_filter)
KVM_RESET_DIRTY_RINGS = io(0xC7)
KVM_SET_MEMORY_ATTRIBUTES = iow(0xD2, kvm_memory_attributes)
KVM_CREATE_GUEST_MEMFD = iowr(0xD4, kvm_create_guest_memfd)
KVM_CREATE_DEVICE = iowr(0xE0, kvm_create_device)
KVM_SET_DEVICE_ATTR = iow(0xE1, kvm_device_attr)
KVM_GET_DEVICE_ATTR = iow(0xE2, kvm_device_attr)
KVM_HAS_DEVICE_ATTR = iow(0xE3, kvm_device_attr)

# VM or vCPU fd
KVM_ENABLE_CAP = iow(0xA3, kvm_enable_cap)

# vCPU fd
KVM_RUN = io(0x80)
KVM_GET_REGS = ior(0x81, kvm_regs)
KVM_SET_REGS = iow(0x82, kvm_regs)
KVM_GET_SREGS = ior(0x83, kvm_sregs)
KVM_SET_SREGS = iow(0x84, kvm_sregs)
KVM_TRANSLATE = iowr(0x85, kvm_translation)
KVM_INTERRUPT = iow(0x86, kvm_interrupt)
KVM_GET_MSRS = iowr(0x88, kvm_msrs)
KVM_SET_MSRS = iow(0x89, kvm_msrs)
KVM_SET_SIGNAL_MASK = iow(0x8B, kvm_signal_mask)
KVM_GET_FPU = ior(0x8C, kvm_fpu)
KVM_SET_FPU = iow(0x8D, kvm_fpu)
KVM_GET_LAPIC = ior(0x8E, kvm_lapic_state)
KVM_SET_LAPIC = iow(0x8F, kvm_lapic_state)
KVM_SET_CPUID2 = iow(0x90, kvm_cpuid2)
KVM_GET_CPUID2 = iowr(0x91, kvm_cpuid2)
KVM_TPR_ACCESS_REPORTING = iowr(0x92, kvm_tpr_access_ctl)
KVM_SET_VAPIC_ADDR = iow(0x93, kvm_vapic_addr)
KVM_GET_MP_STATE = ior(0x98, kvm_mp_state)
KVM_SET_MP_STATE = iow(0x99, kvm_mp_state)
KVM_NMI = io(0x9A)
KVM_SET_GUEST_DEBUG = iow(0x9B, kvm_guest_debug)
KVM_X86_SETUP_MCE = iow(0x9C, c_uint64)
KVM_X86_SET_MCE = iow(0x9E, kvm_x86_mce)
KVM_GET_VCPU_EVENTS = ior(0x9F, kvm_vcpu_events)
KVM_SET_VCPU_EVENTS = iow(0xA0, kvm_vcpu_events)
KVM_GET_DEBUGREGS = ior(0xA1, kvm_debugregs)
KVM_SET_DEBUGREGS = iow(0xA2, kvm_debugregs)
KVM_GET_XSAVE = ior(0xA4, kvm_xsave)
KVM_SET_XSAVE = iow(0xA5, kvm_xsave)
KVM_GET_XCRS = ior(0xA6, kvm_xcrs)
KVM_SET_XCRS = iow(0xA7, kvm_xcrs)
KVM_GET_ONE_REG = iow(0xAB, kvm_one_reg)
KVM_SET_ONE_REG = iow(0xAC, kvm_one_reg)
KVM_KVMCLOCK_CTRL = io(0xAD)
KVM_GET_REG_LIST = iowr(0xB0, kvm_reg_list)
KVM_SMI = io(0xB7)
KVM_GET_NESTED_STATE = iowr(0xBE, kvm_nested_state)
KVM_SET_NESTED_STATE = iow(0xBF, kvm_nested_state)
KVM_GET_SUPPORTED_HV_CPUID = iowr(0xC1, kvm_cpuid2)
KVM_GET_SREGS2 = ior(0xCC, kvm_sregs2)
KVM_SET_SREGS2 = iow(0xCD, kvm_sregs2)
KVM_GET_XSAVE2 = ior(0xCF, kvm_xsave)
KVM_PRE_FAULT_MEMORY = iowr(0xD5, kvm_pre_fault_memory)


def ioctl_name(request: int) -> str:
    """The KVM_* name of a request number, for error messages."""
    return _NAMES.get(request, f"ioctl {request:#x}")


_NAMES: dict[int, str] = {}
for _name, _value in list(globals().items()):
    if _name.startswith("KVM_") and isinstance(_value, int) and _name != "KVM_API_VERSION":
        # Two requests share a number (IRQ_LINE_STATUS / REGISTER_COALESCED_MMIO differ in
        # direction, so they do not collide); the first name wins on a true clash.
        _NAMES.setdefault(_value, _name)


def ioctl_names() -> set[str]:
    """Every KVM ioctl name this mirror defines."""
    return set(_NAMES.values())
