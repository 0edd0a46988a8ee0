"""Structure sizes and offsets, and ioctl numbers, against the 6.18 uAPI.

Expected values are those measured on a 6.18 host (shared/docs/kvm-api-facts.md
and kvm-api-reference.md) and computed from the kernel headers.
"""

import ctypes

import pytest

from kvmkit.uapi import control, cpu, ioctls, irq, memory, run
from kvmkit.uapi.caps import Cap
from kvmkit.uapi.exits import ExitReason
from kvmkit.uapi.ioctl import ioc

SIZES = {
    memory.kvm_userspace_memory_region: 32,
    memory.kvm_userspace_memory_region2: 160,
    memory.kvm_create_guest_memfd: 64,
    memory.kvm_memory_attributes: 32,
    memory.kvm_pre_fault_memory: 64,
    memory.kvm_dirty_log: 16,
    memory.kvm_clear_dirty_log: 24,
    memory.kvm_dirty_gfn: 16,
    memory.kvm_coalesced_mmio_zone: 16,
    run.kvm_run: 2352,
    run.kvm_sync_regs: 520,
    cpu.kvm_regs: 144,
    cpu.kvm_segment: 24,
    cpu.kvm_dtable: 16,
    cpu.kvm_sregs: 312,
    cpu.kvm_sregs2: 320,
    cpu.kvm_fpu: 416,
    cpu.kvm_xsave: 4096,
    cpu.kvm_xcr: 16,
    cpu.kvm_xcrs: 392,
    cpu.kvm_msrs: 8,
    cpu.kvm_msr_entry: 16,
    cpu.kvm_msr_list: 4,
    cpu.kvm_cpuid2: 8,
    cpu.kvm_cpuid_entry2: 40,
    cpu.kvm_lapic_state: 1024,
    cpu.kvm_vcpu_events: 64,
    cpu.kvm_mp_state: 4,
    cpu.kvm_debugregs: 128,
    cpu.kvm_guest_debug: 72,
    cpu.kvm_guest_debug_arch: 64,
    cpu.kvm_debug_exit_arch: 32,
    cpu.kvm_x86_mce: 64,
    cpu.kvm_nested_state: 128,
    cpu.kvm_translation: 24,
    cpu.kvm_interrupt: 4,
    cpu.kvm_signal_mask: 4,
    cpu.kvm_one_reg: 16,
    cpu.kvm_tpr_access_ctl: 40,
    cpu.kvm_vapic_addr: 8,
    cpu.kvm_msr_filter: 392,
    cpu.kvm_msr_filter_range: 24,
    irq.kvm_irqchip: 520,
    irq.kvm_pic_state: 16,
    irq.kvm_ioapic_state: 216,
    irq.kvm_pit_state2: 112,
    irq.kvm_pit_channel_state: 24,
    irq.kvm_pit_config: 64,
    irq.kvm_clock_data: 48,
    irq.kvm_irqfd: 32,
    irq.kvm_ioeventfd: 64,
    irq.kvm_irq_level: 8,
    irq.kvm_msi: 32,
    irq.kvm_irq_routing: 8,
    irq.kvm_irq_routing_entry: 48,
    irq.kvm_reinject_control: 32,
    control.kvm_enable_cap: 104,
    control.kvm_pmu_event_filter: 32,
    control.kvm_create_device: 12,
    control.kvm_device_attr: 24,
    control.kvm_xen_hvm_config: 56,
}


@pytest.mark.parametrize("struct, size", SIZES.items(), ids=lambda x: getattr(x, "__name__", ""))
def test_struct_size(struct, size):
    assert ctypes.sizeof(struct) == size


OFFSETS = [
    (memory.kvm_userspace_memory_region2, "guest_memfd_offset", 32),
    (memory.kvm_userspace_memory_region2, "guest_memfd", 40),
    (memory.kvm_userspace_memory_region2, "pad2", 48),
    (run.kvm_run, "immediate_exit", 1),
    (run.kvm_run, "exit_reason", 8),
    (run.kvm_run, "flags", 14),
    (run.kvm_run, "cr8", 16),
    (run.kvm_run, "apic_base", 24),
    (run.kvm_run, "exit", 32),
    (run.kvm_run, "kvm_valid_regs", 288),
    (run.kvm_run, "kvm_dirty_regs", 296),
    (run.kvm_run, "s", 304),
    (cpu.kvm_regs, "rip", 128),
    (cpu.kvm_regs, "rflags", 136),
    (cpu.kvm_segment, "selector", 12),
    (cpu.kvm_segment, "unusable", 22),
    (cpu.kvm_sregs, "gdt", 192),
    (cpu.kvm_sregs, "idt", 208),
    (cpu.kvm_sregs, "cr0", 224),
    (cpu.kvm_sregs, "efer", 264),
    (cpu.kvm_sregs, "apic_base", 272),
    (cpu.kvm_sregs, "interrupt_bitmap", 280),
    (cpu.kvm_sregs2, "flags", 280),
    (cpu.kvm_sregs2, "pdptrs", 288),
    (cpu.kvm_fpu, "fcw", 128),
    (cpu.kvm_fpu, "last_opcode", 134),
    (cpu.kvm_fpu, "last_ip", 136),
    (cpu.kvm_fpu, "xmm", 152),
    (cpu.kvm_fpu, "mxcsr", 408),
    (cpu.kvm_xcrs, "xcrs", 8),
    (cpu.kvm_vcpu_events, "interrupt", 8),
    (cpu.kvm_vcpu_events, "nmi", 12),
    (cpu.kvm_vcpu_events, "sipi_vector", 16),
    (cpu.kvm_vcpu_events, "flags", 20),
    (cpu.kvm_vcpu_events, "smi", 24),
    (cpu.kvm_vcpu_events, "triple_fault", 28),
    (cpu.kvm_vcpu_events, "exception_has_payload", 55),
    (cpu.kvm_vcpu_events, "exception_payload", 56),
    (cpu.kvm_debugregs, "dr6", 32),
    (cpu.kvm_debugregs, "flags", 48),
    (cpu.kvm_x86_mce, "bank", 32),
    (cpu.kvm_msr_filter, "ranges", 8),
    (cpu.kvm_msr_filter_range, "bitmap", 16),
    (irq.kvm_ioapic_state, "redirtbl", 24),
    (irq.kvm_irqchip, "chip", 8),
    (irq.kvm_pit_state2, "flags", 72),
    (irq.kvm_pit_channel_state, "count_load_time", 16),
    (irq.kvm_clock_data, "realtime", 16),
    (irq.kvm_clock_data, "host_tsc", 24),
    (irq.kvm_ioeventfd, "len", 16),
    (irq.kvm_ioeventfd, "fd", 20),
    (irq.kvm_ioeventfd, "flags", 24),
    (irq.kvm_msi, "devid", 16),
    (irq.kvm_irqfd, "resamplefd", 12),
    (control.kvm_enable_cap, "args", 8),
    (control.kvm_enable_cap, "pad", 40),
    (control.kvm_pmu_event_filter, "flags", 12),
    (memory.kvm_clear_dirty_log, "dirty_bitmap", 16),
]


@pytest.mark.parametrize("struct, field, offset", OFFSETS, ids=lambda x: getattr(x, "__name__", x))
def test_field_offset(struct, field, offset):
    assert getattr(struct, field).offset == offset


def test_kvm_run_exit_union_members():
    e = run.kvm_run_exit
    assert ctypes.sizeof(e) == 256
    io = run.kvm_run_io
    assert [
        getattr(io, f).offset for f in ("direction", "size", "port", "count", "data_offset")
    ] == [0, 1, 2, 4, 8]
    assert run.kvm_run_mmio.len.offset == 16 and run.kvm_run_mmio.is_write.offset == 20
    assert run.kvm_run_internal.data.offset == 8
    assert run.kvm_run_system_event.data.offset == 8
    assert run.kvm_run_msr.index.offset == 12 and run.kvm_run_msr.data.offset == 16
    assert run.kvm_run_memory_fault.size.offset == 16
    assert run.kvm_sync_regs.sregs.offset == 144 and run.kvm_sync_regs.events.offset == 456


# Numbers as listed in kvm-api-facts.md / kvm-api-reference.md (computed from 6.18 headers).
IOCTLS = {
    "KVM_GET_API_VERSION": 0x0000AE00,
    "KVM_CREATE_VM": 0x0000AE01,
    "KVM_GET_MSR_INDEX_LIST": 0xC004AE02,
    "KVM_CHECK_EXTENSION": 0x0000AE03,
    "KVM_GET_VCPU_MMAP_SIZE": 0x0000AE04,
    "KVM_GET_SUPPORTED_CPUID": 0xC008AE05,
    "KVM_GET_EMULATED_CPUID": 0xC008AE09,
    "KVM_GET_MSR_FEATURE_INDEX_LIST": 0xC004AE0A,
    "KVM_CREATE_VCPU": 0x0000AE41,
    "KVM_GET_DIRTY_LOG": 0x4010AE42,
    "KVM_SET_NR_MMU_PAGES": 0x0000AE44,
    "KVM_SET_USER_MEMORY_REGION": 0x4020AE46,
    "KVM_SET_TSS_ADDR": 0x0000AE47,
    "KVM_SET_IDENTITY_MAP_ADDR": 0x4008AE48,
    "KVM_SET_USER_MEMORY_REGION2": 0x40A0AE49,
    "KVM_CREATE_IRQCHIP": 0x0000AE60,
    "KVM_IRQ_LINE": 0x4008AE61,
    "KVM_GET_IRQCHIP": 0xC208AE62,
    "KVM_SET_IRQCHIP": 0x8208AE63,
    "KVM_CREATE_PIT": 0x0000AE64,
    "KVM_IRQ_LINE_STATUS": 0xC008AE67,
    "KVM_REGISTER_COALESCED_MMIO": 0x4010AE67,
    "KVM_UNREGISTER_COALESCED_MMIO": 0x4010AE68,
    "KVM_SET_GSI_ROUTING": 0x4008AE6A,
    "KVM_REINJECT_CONTROL": 0x0000AE71,
    "KVM_IRQFD": 0x4020AE76,
    "KVM_CREATE_PIT2": 0x4040AE77,
    "KVM_SET_BOOT_CPU_ID": 0x0000AE78,
    "KVM_IOEVENTFD": 0x4040AE79,
    "KVM_SET_CLOCK": 0x4030AE7B,
    "KVM_GET_CLOCK": 0x8030AE7C,
    "KVM_GET_PIT2": 0x8070AE9F,
    "KVM_SET_PIT2": 0x4070AEA0,
    "KVM_SIGNAL_MSI": 0x4020AEA5,
    "KVM_CREATE_DEVICE": 0xC00CAEE0,
    "KVM_SET_DEVICE_ATTR": 0x4018AEE1,
    "KVM_GET_DEVICE_ATTR": 0x4018AEE2,
    "KVM_HAS_DEVICE_ATTR": 0x4018AEE3,
    "KVM_SET_PMU_EVENT_FILTER": 0x4020AEB2,
    "KVM_CLEAR_DIRTY_LOG": 0xC018AEC0,
    "KVM_X86_SET_MSR_FILTER": 0x4188AEC6,
    "KVM_RESET_DIRTY_RINGS": 0x0000AEC7,
    "KVM_SET_MEMORY_ATTRIBUTES": 0x4020AED2,
    "KVM_CREATE_GUEST_MEMFD": 0xC040AED4,
    "KVM_ENABLE_CAP": 0x4068AEA3,
    "KVM_RUN": 0x0000AE80,
    "KVM_GET_REGS": 0x8090AE81,
    "KVM_SET_REGS": 0x4090AE82,
    "KVM_GET_SREGS": 0x8138AE83,
    "KVM_SET_SREGS": 0x4138AE84,
    "KVM_TRANSLATE": 0xC018AE85,
    "KVM_INTERRUPT": 0x4004AE86,
    "KVM_GET_MSRS": 0xC008AE88,
    "KVM_SET_MSRS": 0x4008AE89,
    "KVM_SET_SIGNAL_MASK": 0x4004AE8B,
    "KVM_GET_FPU": 0x81A0AE8C,
    "KVM_SET_FPU": 0x41A0AE8D,
    "KVM_GET_LAPIC": 0x8400AE8E,
    "KVM_SET_LAPIC": 0x4400AE8F,
    "KVM_SET_CPUID2": 0x4008AE90,
    "KVM_GET_CPUID2": 0xC008AE91,
    "KVM_TPR_ACCESS_REPORTING": 0xC028AE92,
    "KVM_SET_VAPIC_ADDR": 0x4008AE93,
    "KVM_GET_MP_STATE": 0x8004AE98,
    "KVM_SET_MP_STATE": 0x4004AE99,
    "KVM_NMI": 0x0000AE9A,
    "KVM_SET_GUEST_DEBUG": 0x4048AE9B,
    "KVM_X86_SETUP_MCE": 0x4008AE9C,
    "KVM_X86_GET_MCE_CAP_SUPPORTED": 0x8008AE9D,
    "KVM_X86_SET_MCE": 0x4040AE9E,
    "KVM_GET_VCPU_EVENTS": 0x8040AE9F,
    "KVM_SET_VCPU_EVENTS": 0x4040AEA0,
    "KVM_GET_DEBUGREGS": 0x8080AEA1,
    "KVM_SET_DEBUGREGS": 0x4080AEA2,
    "KVM_GET_XSAVE": 0x9000AEA4,
    "KVM_SET_XSAVE": 0x5000AEA5,
    "KVM_GET_XCRS": 0x8188AEA6,
    "KVM_SET_XCRS": 0x4188AEA7,
    "KVM_GET_ONE_REG": 0x4010AEAB,
    "KVM_SET_ONE_REG": 0x4010AEAC,
    "KVM_KVMCLOCK_CTRL": 0x0000AEAD,
    "KVM_GET_REG_LIST": 0xC008AEB0,
    "KVM_SMI": 0x0000AEB7,
    "KVM_GET_NESTED_STATE": 0xC080AEBE,
    "KVM_SET_NESTED_STATE": 0x4080AEBF,
    "KVM_GET_SUPPORTED_HV_CPUID": 0xC008AEC1,
    "KVM_GET_SREGS2": 0x8140AECC,
    "KVM_SET_SREGS2": 0x4140AECD,
    "KVM_GET_XSAVE2": 0x9000AECF,
    "KVM_PRE_FAULT_MEMORY": 0xC040AED5,
}


@pytest.mark.parametrize("name, number", IOCTLS.items())
def test_ioctl_number(name, number):
    assert getattr(ioctls, name) == number


def test_ioctl_names_for_errors():
    assert ioctls.ioctl_name(0xC040AED4) == "KVM_CREATE_GUEST_MEMFD"
    assert ioctls.ioctl_name(0x1234) == "ioctl 0x1234"


def test_ioc_rejects_oversized_argument():
    with pytest.raises(ValueError):
        ioc(1, 0x01, 1 << 14)


CAPS = {
    "IRQCHIP": 0,
    "NR_VCPUS": 9,
    "MAX_VCPUS": 66,
    "IRQFD": 32,
    "IOEVENTFD": 36,
    "X86_SMM": 117,
    "MANUAL_DIRTY_LOG_PROTECT2": 168,
    "PMU_EVENT_FILTER": 173,
    "DIRTY_LOG_RING": 192,
    "SREGS2": 200,
    "XSAVE2": 208,
    "PMU_CAPABILITY": 212,
    "DIRTY_LOG_RING_ACQ_REL": 223,
    "DIRTY_LOG_RING_WITH_BITMAP": 225,
    "USER_MEMORY2": 231,
    "MEMORY_FAULT_INFO": 232,
    "MEMORY_ATTRIBUTES": 233,
    "GUEST_MEMFD": 234,
    "VM_TYPES": 235,
    "PRE_FAULT_MEMORY": 236,
    "GUEST_MEMFD_FLAGS": 244,
}


@pytest.mark.parametrize("name, number", CAPS.items())
def test_capability_number(name, number):
    assert Cap[name] == number


def test_exit_reasons():
    assert ExitReason.IO == 2 and ExitReason.HLT == 5 and ExitReason.SHUTDOWN == 8
    assert ExitReason.INTERNAL_ERROR == 17 and ExitReason.SYSTEM_EVENT == 24
    assert ExitReason.MEMORY_FAULT == 39
    assert ExitReason.name_of(999) == "exit 999"
