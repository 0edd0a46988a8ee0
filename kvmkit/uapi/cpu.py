"""x86 vCPU state structures (arch/x86/include/uapi/asm/kvm.h)."""

import ctypes
from ctypes import c_uint8, c_uint16, c_uint32, c_uint64

KVM_NR_INTERRUPTS = 256


class kvm_regs(ctypes.Structure):
    _fields_ = [
        (name, c_uint64)
        for name in (
            "rax rbx rcx rdx rsi rdi rsp rbp r8 r9 r10 r11 r12 r13 r14 r15 rip rflags".split()
        )
    ]


class kvm_segment(ctypes.Structure):
    _fields_ = [
        ("base", c_uint64),
        ("limit", c_uint32),
        ("selector", c_uint16),
        ("type", c_uint8),
        ("present", c_uint8),
        ("dpl", c_uint8),
        ("db", c_uint8),
        ("s", c_uint8),
        ("l", c_uint8),
        ("g", c_uint8),
        ("avl", c_uint8),
        ("unusable", c_uint8),
        ("padding", c_uint8),
    ]


class kvm_dtable(ctypes.Structure):
    _fields_ = [("base", c_uint64), ("limit", c_uint16), ("padding", c_uint16 * 3)]


_SEGMENTS = [(name, kvm_segment) for name in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")]
_CONTROL = [(name, c_uint64) for name in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")]


class kvm_sregs(ctypes.Structure):
    _fields_ = [
        *_SEGMENTS,
        ("gdt", kvm_dtable),
        ("idt", kvm_dtable),
        *_CONTROL,
        ("interrupt_bitmap", c_uint64 * ((KVM_NR_INTERRUPTS + 63) // 64)),
    ]


KVM_SREGS2_FLAGS_PDPTRS_VALID = 1


class kvm_sregs2(ctypes.Structure):
    _fields_ = [
        *_SEGMENTS,
        ("gdt", kvm_dtable),
        ("idt", kvm_dtable),
        *_CONTROL,
        ("flags", c_uint64),
        ("pdptrs", c_uint64 * 4),
    ]


class kvm_fpu(ctypes.Structure):
    _fields_ = [
        ("fpr", (c_uint8 * 16) * 8),
        ("fcw", c_uint16),
        ("fsw", c_uint16),
        ("ftwx", c_uint8),
        ("pad1", c_uint8),
        ("last_opcode", c_uint16),
        ("last_ip", c_uint64),
        ("last_dp", c_uint64),
        ("xmm", (c_uint8 * 16) * 16),
        ("mxcsr", c_uint32),
        ("pad2", c_uint32),
    ]


class kvm_xsave(ctypes.Structure):
    """The legacy 4 KiB XSAVE area; KVM_GET_XSAVE2 may need a larger buffer."""

    _fields_ = [("region", c_uint32 * 1024)]


class kvm_xcr(ctypes.Structure):
    _fields_ = [("xcr", c_uint32), ("reserved", c_uint32), ("value", c_uint64)]


KVM_MAX_XCRS = 16


class kvm_xcrs(ctypes.Structure):
    _fields_ = [
        ("nr_xcrs", c_uint32),
        ("flags", c_uint32),
        ("xcrs", kvm_xcr * KVM_MAX_XCRS),
        ("padding", c_uint64 * 16),
    ]


class kvm_msr_entry(ctypes.Structure):
    _fields_ = [("index", c_uint32), ("reserved", c_uint32), ("data", c_uint64)]


class kvm_msrs(ctypes.Structure):
    """Header only; `kvm_msr_entry` items follow it in the same buffer."""

    _fields_ = [("nmsrs", c_uint32), ("pad", c_uint32)]


class kvm_msr_list(ctypes.Structure):
    """Header only; u32 indices follow it in the same buffer."""

    _fields_ = [("nmsrs", c_uint32)]


KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1 << 0


class kvm_cpuid_entry2(ctypes.Structure):
    _fields_ = [
        ("function", c_uint32),
        ("index", c_uint32),
        ("flags", c_uint32),
        ("eax", c_uint32),
        ("ebx", c_uint32),
        ("ecx", c_uint32),
        ("edx", c_uint32),
        ("padding", c_uint32 * 3),
    ]


class kvm_cpuid2(ctypes.Structure):
    """Header only; `kvm_cpuid_entry2` items follow it in the same buffer."""

    _fields_ = [("nent", c_uint32), ("padding", c_uint32)]


KVM_APIC_REG_SIZE = 0x400


class kvm_lapic_state(ctypes.Structure):
    _fields_ = [("regs", ctypes.c_char * KVM_APIC_REG_SIZE)]


class _events_exception(ctypes.Structure):
    _fields_ = [
        ("injected", c_uint8),
        ("nr", c_uint8),
        ("has_error_code", c_uint8),
        ("pending", c_uint8),
        ("error_code", c_uint32),
    ]


class _events_interrupt(ctypes.Structure):
    _fields_ = [("injected", c_uint8), ("nr", c_uint8), ("soft", c_uint8), ("shadow", c_uint8)]


class _events_nmi(ctypes.Structure):
    _fields_ = [("injected", c_uint8), ("pending", c_uint8), ("masked", c_uint8), ("pad", c_uint8)]


class _events_smi(ctypes.Structure):
    _fields_ = [
        ("smm", c_uint8),
        ("pending", c_uint8),
        ("smm_inside_nmi", c_uint8),
        ("latched_init", c_uint8),
    ]


class _events_triple_fault(ctypes.Structure):
    _fields_ = [("pending", c_uint8)]


KVM_VCPUEVENT_VALID_NMI_PENDING = 0x01
KVM_VCPUEVENT_VALID_SIPI_VECTOR = 0x02
KVM_VCPUEVENT_VALID_SHADOW = 0x04
KVM_VCPUEVENT_VALID_SMM = 0x08
KVM_VCPUEVENT_VALID_PAYLOAD = 0x10
KVM_VCPUEVENT_VALID_TRIPLE_FAULT = 0x20


class kvm_vcpu_events(ctypes.Structure):
    _fields_ = [
        ("exception", _events_exception),
        ("interrupt", _events_interrupt),
        ("nmi", _events_nmi),
        ("sipi_vector", c_uint32),
        ("flags", c_uint32),
        ("smi", _events_smi),
        ("triple_fault", _events_triple_fault),
        ("reserved", c_uint8 * 26),
        ("exception_has_payload", c_uint8),
        ("exception_payload", c_uint64),
    ]


KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_UNINITIALIZED = 1
KVM_MP_STATE_INIT_RECEIVED = 2
KVM_MP_STATE_HALTED = 3
KVM_MP_STATE_SIPI_RECEIVED = 4


class kvm_mp_state(ctypes.Structure):
    _fields_ = [("mp_state", c_uint32)]


class kvm_debugregs(ctypes.Structure):
    _fields_ = [
        ("db", c_uint64 * 4),
        ("dr6", c_uint64),
        ("dr7", c_uint64),
        ("flags", c_uint64),
        ("reserved", c_uint64 * 9),
    ]


KVM_GUESTDBG_ENABLE = 0x00000001
KVM_GUESTDBG_SINGLESTEP = 0x00000002
KVM_GUESTDBG_USE_SW_BP = 0x00010000
KVM_GUESTDBG_USE_HW_BP = 0x00020000
KVM_GUESTDBG_INJECT_DB = 0x00040000
KVM_GUESTDBG_INJECT_BP = 0x00080000
KVM_GUESTDBG_BLOCKIRQ = 0x00100000


class kvm_guest_debug_arch(ctypes.Structure):
    _fields_ = [("debugreg", c_uint64 * 8)]


class kvm_guest_debug(ctypes.Structure):
    _fields_ = [("control", c_uint32), ("pad", c_uint32), ("arch", kvm_guest_debug_arch)]


class kvm_debug_exit_arch(ctypes.Structure):
    _fields_ = [
        ("exception", c_uint32),
        ("pad", c_uint32),
        ("pc", c_uint64),
        ("dr6", c_uint64),
        ("dr7", c_uint64),
    ]


class kvm_x86_mce(ctypes.Structure):
    _fields_ = [
        ("status", c_uint64),
        ("addr", c_uint64),
        ("misc", c_uint64),
        ("mcg_status", c_uint64),
        ("bank", c_uint8),
        ("pad1", c_uint8 * 7),
        ("pad2", c_uint64 * 3),
    ]


class kvm_nested_state(ctypes.Structure):
    """Header only; the vendor data blob (up to KVM_CAP_NESTED_STATE bytes) follows."""

    _fields_ = [
        ("flags", c_uint16),
        ("format", c_uint16),
        ("size", c_uint32),
        ("hdr", c_uint8 * 120),
    ]


class kvm_translation(ctypes.Structure):
    _fields_ = [
        ("linear_address", c_uint64),
        ("physical_address", c_uint64),
        ("valid", c_uint8),
        ("writeable", c_uint8),
        ("usermode", c_uint8),
        ("pad", c_uint8 * 5),
    ]


class kvm_interrupt(ctypes.Structure):
    _fields_ = [("irq", c_uint32)]


class kvm_signal_mask(ctypes.Structure):
    """Header only; `len` bytes of sigset follow."""

    _fields_ = [("len", c_uint32)]


class kvm_one_reg(ctypes.Structure):
    _fields_ = [("id", c_uint64), ("addr", c_uint64)]


class kvm_reg_list(ctypes.Structure):
    _fields_ = [("n", c_uint64)]


class kvm_tpr_access_ctl(ctypes.Structure):
    _fields_ = [("enabled", c_uint32), ("flags", c_uint32), ("reserved", c_uint32 * 8)]


class kvm_vapic_addr(ctypes.Structure):
    _fields_ = [("vapic_addr", c_uint64)]


KVM_MSR_FILTER_MAX_RANGES = 16
KVM_MSR_FILTER_READ = 1 << 0
KVM_MSR_FILTER_WRITE = 1 << 1
KVM_MSR_FILTER_DEFAULT_DENY = 1 << 0


class kvm_msr_filter_range(ctypes.Structure):
    _fields_ = [
        ("flags", c_uint32),
        ("nmsrs", c_uint32),
        ("base", c_uint32),
        ("bitmap", c_uint64),
    ]


class kvm_msr_filter(ctypes.Structure):
    _fields_ = [
        ("flags", c_uint32),
        ("ranges", kvm_msr_filter_range * KVM_MSR_FILTER_MAX_RANGES),
    ]
