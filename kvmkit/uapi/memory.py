"""Memory slots, guest_memfd, memory attributes and dirty tracking structures."""

import ctypes
from ctypes import c_uint8, c_uint32, c_uint64

KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1
KVM_MEM_GUEST_MEMFD = 1 << 2

GUEST_MEMFD_FLAG_MMAP = 1 << 0
GUEST_MEMFD_FLAG_INIT_SHARED = 1 << 1
# Proposed upstream, not in 6.18: removes guest_memfd folios from the direct map.
GUEST_MEMFD_FLAG_NO_DIRECT_MAP = 1 << 2

KVM_MEMORY_ATTRIBUTE_PRIVATE = 1 << 3

KVM_DIRTY_GFN_F_DIRTY = 1 << 0
KVM_DIRTY_GFN_F_RESET = 1 << 1
KVM_DIRTY_LOG_PAGE_OFFSET = 64

KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE = 1 << 0
KVM_DIRTY_LOG_INITIALLY_SET = 1 << 1

KVM_X86_DEFAULT_VM = 0
KVM_X86_SW_PROTECTED_VM = 1
KVM_X86_SEV_VM = 2
KVM_X86_SEV_ES_VM = 3
KVM_X86_SNP_VM = 4
KVM_X86_TDX_VM = 5


class kvm_userspace_memory_region(ctypes.Structure):
    _fields_ = [
        ("slot", c_uint32),
        ("flags", c_uint32),
        ("guest_phys_addr", c_uint64),
        ("memory_size", c_uint64),
        ("userspace_addr", c_uint64),
    ]


class kvm_userspace_memory_region2(ctypes.Structure):
    _fields_ = [
        ("slot", c_uint32),
        ("flags", c_uint32),
        ("guest_phys_addr", c_uint64),
        ("memory_size", c_uint64),
        ("userspace_addr", c_uint64),
        ("guest_memfd_offset", c_uint64),
        ("guest_memfd", c_uint32),
        ("pad1", c_uint32),
        ("pad2", c_uint64 * 14),
    ]


class kvm_create_guest_memfd(ctypes.Structure):
    _fields_ = [("size", c_uint64), ("flags", c_uint64), ("reserved", c_uint64 * 6)]


class kvm_memory_attributes(ctypes.Structure):
    _fields_ = [
        ("address", c_uint64),
        ("size", c_uint64),
        ("attributes", c_uint64),
        ("flags", c_uint64),
    ]


class kvm_pre_fault_memory(ctypes.Structure):
    _fields_ = [
        ("gpa", c_uint64),
        ("size", c_uint64),
        ("flags", c_uint64),
        ("padding", c_uint64 * 5),
    ]


class kvm_dirty_log(ctypes.Structure):
    _fields_ = [("slot", c_uint32), ("padding1", c_uint32), ("dirty_bitmap", c_uint64)]


class kvm_clear_dirty_log(ctypes.Structure):
    _fields_ = [
        ("slot", c_uint32),
        ("num_pages", c_uint32),
        ("first_page", c_uint64),
        ("dirty_bitmap", c_uint64),
    ]


class kvm_dirty_gfn(ctypes.Structure):
    _fields_ = [("flags", c_uint32), ("slot", c_uint32), ("offset", c_uint64)]


class kvm_coalesced_mmio_zone(ctypes.Structure):
    _fields_ = [("addr", c_uint64), ("size", c_uint32), ("pio", c_uint32)]


class kvm_coalesced_mmio(ctypes.Structure):
    _fields_ = [
        ("phys_addr", c_uint64),
        ("len", c_uint32),
        ("pio", c_uint32),
        ("data", c_uint8 * 8),
    ]
