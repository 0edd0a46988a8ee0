"""VM-wide control structures: enable_cap, PMU event filter, devices, Xen config."""

import ctypes
from ctypes import c_uint8, c_uint32, c_uint64


class kvm_enable_cap(ctypes.Structure):
    _fields_ = [
        ("cap", c_uint32),
        ("flags", c_uint32),
        ("args", c_uint64 * 4),
        ("pad", c_uint8 * 64),
    ]


KVM_PMU_EVENT_ALLOW = 0
KVM_PMU_EVENT_DENY = 1
KVM_PMU_EVENT_FLAG_MASKED_EVENTS = 1 << 0
KVM_PMU_CAP_DISABLE = 1 << 0


class kvm_pmu_event_filter(ctypes.Structure):
    """Header only; u64 events follow."""

    _fields_ = [
        ("action", c_uint32),
        ("nevents", c_uint32),
        ("fixed_counter_bitmap", c_uint32),
        ("flags", c_uint32),
        ("pad", c_uint32 * 4),
    ]


def pmu_event(eventsel: int, umask: int) -> int:
    """Encode an x86 event the way kvm_pmu_event_filter.events expects."""
    return (eventsel & 0xFF) | ((umask & 0xFF) << 8) | (((eventsel >> 8) & 0xF) << 32)


KVM_CREATE_DEVICE_TEST = 1


class kvm_create_device(ctypes.Structure):
    _fields_ = [("type", c_uint32), ("fd", c_uint32), ("flags", c_uint32)]


class kvm_device_attr(ctypes.Structure):
    _fields_ = [
        ("flags", c_uint32),
        ("group", c_uint32),
        ("attr", c_uint64),
        ("addr", c_uint64),
    ]


class kvm_xen_hvm_config(ctypes.Structure):
    _fields_ = [
        ("flags", c_uint32),
        ("msr", c_uint32),
        ("blob_addr_32", c_uint64),
        ("blob_addr_64", c_uint64),
        ("blob_size_32", c_uint8),
        ("blob_size_64", c_uint8),
        ("pad2", c_uint8 * 30),
    ]
