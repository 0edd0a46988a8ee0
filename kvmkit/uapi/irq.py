"""Interrupt controller, timer, clock and eventfd structures."""

import ctypes
from ctypes import c_int32, c_int64, c_uint8, c_uint16, c_uint32, c_uint64

KVM_IRQCHIP_PIC_MASTER = 0
KVM_IRQCHIP_PIC_SLAVE = 1
KVM_IRQCHIP_IOAPIC = 2
KVM_IOAPIC_NUM_PINS = 24


class kvm_pic_state(ctypes.Structure):
    _fields_ = [
        (name, c_uint8)
        for name in (
            "last_irr irr imr isr priority_add irq_base read_reg_select poll special_mask "
            "init_state auto_eoi rotate_on_auto_eoi special_fully_nested_mode init4 elcr "
            "elcr_mask"
        ).split()
    ]


class kvm_ioapic_state(ctypes.Structure):
    _fields_ = [
        ("base_address", c_uint64),
        ("ioregsel", c_uint32),
        ("id", c_uint32),
        ("irr", c_uint32),
        ("pad", c_uint32),
        ("redirtbl", c_uint64 * KVM_IOAPIC_NUM_PINS),
    ]


class _irqchip_union(ctypes.Union):
    _fields_ = [
        ("dummy", ctypes.c_char * 512),
        ("pic", kvm_pic_state),
        ("ioapic", kvm_ioapic_state),
    ]


class kvm_irqchip(ctypes.Structure):
    _fields_ = [("chip_id", c_uint32), ("pad", c_uint32), ("chip", _irqchip_union)]


class kvm_irq_level(ctypes.Structure):
    """`irq` in, `status` out (KVM_IRQ_LINE_STATUS): the same u32 in the kernel's union."""

    _fields_ = [("irq", c_uint32), ("level", c_uint32)]


KVM_MSI_VALID_DEVID = 1 << 0


class kvm_msi(ctypes.Structure):
    _fields_ = [
        ("address_lo", c_uint32),
        ("address_hi", c_uint32),
        ("data", c_uint32),
        ("flags", c_uint32),
        ("devid", c_uint32),
        ("pad", c_uint8 * 12),
    ]


KVM_IRQFD_FLAG_DEASSIGN = 1 << 0
KVM_IRQFD_FLAG_RESAMPLE = 1 << 1


class kvm_irqfd(ctypes.Structure):
    _fields_ = [
        ("fd", c_uint32),
        ("gsi", c_uint32),
        ("flags", c_uint32),
        ("resamplefd", c_uint32),
        ("pad", c_uint8 * 16),
    ]


KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
KVM_IOEVENTFD_FLAG_PIO = 1 << 1
KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2
KVM_IOEVENTFD_FLAG_VIRTIO_CCW_NOTIFY = 1 << 3
KVM_IOEVENTFD_FLAG_FAST_MMIO = 1 << 4


class kvm_ioeventfd(ctypes.Structure):
    _fields_ = [
        ("datamatch", c_uint64),
        ("addr", c_uint64),
        ("len", c_uint32),
        ("fd", c_int32),
        ("flags", c_uint32),
        ("pad", c_uint8 * 36),
    ]


KVM_PIT_SPEAKER_DUMMY = 1


class kvm_pit_config(ctypes.Structure):
    _fields_ = [("flags", c_uint32), ("pad", c_uint32 * 15)]


class kvm_pit_channel_state(ctypes.Structure):
    _fields_ = [
        ("count", c_uint32),
        ("latched_count", c_uint16),
        ("count_latched", c_uint8),
        ("status_latched", c_uint8),
        ("status", c_uint8),
        ("read_state", c_uint8),
        ("write_state", c_uint8),
        ("write_latch", c_uint8),
        ("rw_mode", c_uint8),
        ("mode", c_uint8),
        ("bcd", c_uint8),
        ("gate", c_uint8),
        ("count_load_time", c_int64),
    ]


KVM_PIT_FLAGS_HPET_LEGACY = 0x00000001
KVM_PIT_FLAGS_SPEAKER_DATA_ON = 0x00000002


class kvm_pit_state2(ctypes.Structure):
    _fields_ = [
        ("channels", kvm_pit_channel_state * 3),
        ("flags", c_uint32),
        ("reserved", c_uint32 * 9),
    ]


KVM_CLOCK_TSC_STABLE = 2
KVM_CLOCK_REALTIME = 1 << 2
KVM_CLOCK_HOST_TSC = 1 << 3


class kvm_clock_data(ctypes.Structure):
    _fields_ = [
        ("clock", c_uint64),
        ("flags", c_uint32),
        ("pad0", c_uint32),
        ("realtime", c_uint64),
        ("host_tsc", c_uint64),
        ("pad", c_uint32 * 4),
    ]


KVM_IRQ_ROUTING_IRQCHIP = 1
KVM_IRQ_ROUTING_MSI = 2


class kvm_irq_routing_irqchip(ctypes.Structure):
    _fields_ = [("irqchip", c_uint32), ("pin", c_uint32)]


class kvm_irq_routing_msi(ctypes.Structure):
    _fields_ = [
        ("address_lo", c_uint32),
        ("address_hi", c_uint32),
        ("data", c_uint32),
        ("devid", c_uint32),
    ]


class _routing_union(ctypes.Union):
    _fields_ = [
        ("irqchip", kvm_irq_routing_irqchip),
        ("msi", kvm_irq_routing_msi),
        ("pad", c_uint32 * 8),
    ]


class kvm_irq_routing_entry(ctypes.Structure):
    _fields_ = [
        ("gsi", c_uint32),
        ("type", c_uint32),
        ("flags", c_uint32),
        ("pad", c_uint32),
        ("u", _routing_union),
    ]


class kvm_irq_routing(ctypes.Structure):
    """Header only; `kvm_irq_routing_entry` items follow."""

    _fields_ = [("nr", c_uint32), ("flags", c_uint32)]


class kvm_reinject_control(ctypes.Structure):
    _fields_ = [("pit_reinject", c_uint8), ("reserved", c_uint8 * 31)]
