"""MultiProcessor Specification 1.4 tables: how a guest without ACPI finds its CPUs, its
I/O APIC and how interrupts are wired.

Layout (facts from the Intel MP Specification 1.4, chapter 4): a 16-byte floating
pointer ("_MP_") at `base_gpa`, which Linux finds by scanning 0x9fc00-0xa0000 among
other places, and right after it the configuration table ("PCMP", 44-byte header)
with entries in type order: processors (20 bytes each), the ISA bus, the I/O APIC,
I/O interrupt assignments, local interrupt assignments (8 bytes each). Each part's
bytes sum to 0 mod 256.

ISA IRQs are routed to the I/O APIC pin of the same number by default: that is what
KVM's default GSI routing does (KVM_CREATE_IRQCHIP routes GSI n to I/O APIC pin n, and
the in-kernel PIT raises GSI 0), and kvmkit keeps that routing. A VMM that routes
GSI 0 to pin 2, as PC firmware and QEMU do, passes irq0_pin=2. IRQ 2 (the PIC cascade)
is never listed. `extra_irqs` are the GSIs of devices such as virtio-mmio: edge
triggered, active high (the ISA bus default), on the pin of the same number. Edge,
because those devices interrupt through irqfds, which pulse the line: on a level
pin KVM's IOAPIC drops a pulse that arrives while the previous one is in service
(remote IRR set), and the guest would wait for a used buffer it is never told of.
"""

import struct
from collections.abc import Iterable, Sequence

from kvmkit.errors import ConfigError

MPF_SIGNATURE = b"_MP_"
MPC_SIGNATURE = b"PCMP"
SPEC_REV = 4  # 1.4
OEM_ID = b"KVMKIT  "
PRODUCT_ID = b"KVMKIT VM   "

MP_PROCESSOR = 0
MP_BUS = 1
MP_IOAPIC = 2
MP_INTSRC = 3
MP_LINTSRC = 4

MP_INT = 0
MP_NMI = 1
MP_EXTINT = 3

CPU_ENABLED = 1
CPU_BOOTPROCESSOR = 2
IOAPIC_ENABLED = 1
POLARITY_ACTIVE_HIGH = 0x1
TRIGGER_LEVEL = 0x3 << 2
FLAGS_CONFORMING = 0  # the bus default: edge, active high for ISA
FLAGS_LEVEL_HIGH = POLARITY_ACTIVE_HIGH | TRIGGER_LEVEL

LAPIC_VERSION = 0x14  # integrated local APIC, as KVM's
IOAPIC_VERSION = 0x11  # as KVM's I/O APIC
CPU_SIGNATURE = 0x600  # family 6
CPU_FEATURES = (1 << 0) | (1 << 9)  # CPUID.1:EDX FPU, APIC
ISA_BUS_ID = 0
ISA_BUS_TYPE = b"ISA   "
IOAPIC_PINS = 24  # KVM's I/O APIC
CASCADE_IRQ = 2
ALL_LAPICS = 0xFF
MAX_APIC_ID = 254  # 0xff is the broadcast id

FLOATING_POINTER_SIZE = 16
HEADER_SIZE = 44
PROCESSOR_ENTRY_SIZE = 20
ENTRY_SIZE = 8


def checksum(data: bytes) -> int:
    """The byte that makes `data` plus it sum to 0 mod 256."""
    return -sum(data) & 0xFF


def mptable_size(nr_cpus: int, nr_interrupts: int) -> int:
    """Bytes for `nr_cpus` processors and `nr_interrupts` I/O interrupt entries."""
    entries = ENTRY_SIZE * (1 + 1 + nr_interrupts + 2)  # bus, IOAPIC, I/O ints, 2 local ints
    return FLOATING_POINTER_SIZE + HEADER_SIZE + PROCESSOR_ENTRY_SIZE * nr_cpus + entries


def interrupt_routes(
    isa_irqs: Iterable[int], extra_irqs: Sequence[int], irq0_pin: int = 0
) -> list[tuple[int, int, int]]:
    """(source IRQ, I/O APIC pin, flags) for each I/O interrupt entry, by pin."""
    if irq0_pin not in (0, 2):
        raise ConfigError(f"IRQ 0 goes to I/O APIC pin 0 or 2, not {irq0_pin}")
    routes: dict[int, tuple[int, int, int]] = {}
    for irq in isa_irqs:
        if not 0 <= irq < 16:
            raise ConfigError(f"ISA IRQ {irq} is not in 0-15")
        if irq == CASCADE_IRQ:
            continue
        pin = irq0_pin if irq == 0 else irq
        routes[pin] = (irq, pin, FLAGS_CONFORMING)
    seen = set()
    for gsi in extra_irqs:
        if not 0 <= gsi < IOAPIC_PINS or gsi in (0, CASCADE_IRQ, irq0_pin):
            raise ConfigError(
                f"device GSI {gsi} is not usable: give I/O APIC pins 1-{IOAPIC_PINS - 1} other"
                " than 2 (the timer and the PIC cascade)"
            )
        if gsi in seen:
            raise ConfigError(f"device GSI {gsi} is given twice; give each device its own")
        seen.add(gsi)
        routes[gsi] = (gsi, gsi, FLAGS_CONFORMING)
    return [routes[pin] for pin in sorted(routes)]


def build_mptable(
    nr_cpus: int,
    base_gpa: int,
    ioapic_id: int,
    ioapic_addr: int = 0xFEC00000,
    lapic_addr: int = 0xFEE00000,
    isa_irqs: Iterable[int] = range(16),
    extra_irqs: Sequence[int] = (),
    irq0_pin: int = 0,
) -> bytes:
    """The floating pointer and configuration table to write at `base_gpa`, for CPUs
    with APIC ids 0..nr_cpus-1 (CPU 0 boots) and one I/O APIC."""
    if not 1 <= nr_cpus <= MAX_APIC_ID:
        raise ConfigError(f"{nr_cpus} vCPUs: an MP table describes 1 to {MAX_APIC_ID}")
    if not 0 <= ioapic_id <= MAX_APIC_ID or ioapic_id < nr_cpus:
        raise ConfigError(
            f"I/O APIC id {ioapic_id} collides with the CPUs' APIC ids 0-{nr_cpus - 1}: give"
            f" {nr_cpus} to {MAX_APIC_ID}"
        )
    if base_gpa % 16 or base_gpa + FLOATING_POINTER_SIZE + HEADER_SIZE > 1 << 32:
        raise ConfigError(f"MP table address {base_gpa:#x} is not 16-byte aligned below 4 GiB")
    routes = interrupt_routes(isa_irqs, extra_irqs, irq0_pin)

    entries = []
    for apic_id in range(nr_cpus):
        flags = CPU_ENABLED | (CPU_BOOTPROCESSOR if apic_id == 0 else 0)
        entries.append(
            struct.pack(
                "<BBBBII8x",
                MP_PROCESSOR,
                apic_id,
                LAPIC_VERSION,
                flags,
                CPU_SIGNATURE,
                CPU_FEATURES,
            )
        )
    entries.append(struct.pack("<BB6s", MP_BUS, ISA_BUS_ID, ISA_BUS_TYPE))
    entries.append(
        struct.pack("<BBBBI", MP_IOAPIC, ioapic_id, IOAPIC_VERSION, IOAPIC_ENABLED, ioapic_addr)
    )
    for irq, pin, flags in routes:
        entries.append(
            struct.pack("<BBHBBBB", MP_INTSRC, MP_INT, flags, ISA_BUS_ID, irq, ioapic_id, pin)
        )
    for kind, lint in ((MP_EXTINT, 0), (MP_NMI, 1)):
        entries.append(
            struct.pack(
                "<BBHBBBB", MP_LINTSRC, kind, FLAGS_CONFORMING, ISA_BUS_ID, 0, ALL_LAPICS, lint
            )
        )
    body = b"".join(entries)
    header = bytearray(
        struct.pack(
            "<4sHBB8s12sIHHIHBB",
            MPC_SIGNATURE,
            HEADER_SIZE + len(body),
            SPEC_REV,
            0,
            OEM_ID,
            PRODUCT_ID,
            0,
            0,
            len(entries),
            lapic_addr,
            0,
            0,
            0,
        )
    )
    header[7] = checksum(bytes(header) + body)
    floating = bytearray(
        struct.pack(
            "<4sIBBBBB3x", MPF_SIGNATURE, base_gpa + FLOATING_POINTER_SIZE, 1, SPEC_REV, 0, 0, 0
        )
    )
    floating[10] = checksum(bytes(floating))
    return bytes(floating) + bytes(header) + body
