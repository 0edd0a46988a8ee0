"""The MP table, parsed back with a reader written from the MP Specification 1.4."""

import struct
from dataclasses import dataclass, field

import pytest

from kvmkit.arch.x86.mptable import build_mptable, mptable_size
from kvmkit.errors import ConfigError

BASE = 0x9FC00
SIZES = {0: 20, 1: 8, 2: 8, 3: 8, 4: 8}


@dataclass
class Parsed:
    lapic: int
    cpus: list[tuple[int, int]] = field(default_factory=list)  # (apic id, flags)
    buses: list[tuple[int, bytes]] = field(default_factory=list)
    ioapics: list[tuple[int, int, int]] = field(default_factory=list)  # (id, flags, address)
    ints: list[tuple[int, int, int, int, int, int]] = field(default_factory=list)
    lints: list[tuple[int, int, int, int, int, int]] = field(default_factory=list)
    types: list[int] = field(default_factory=list)


def parse(raw: bytes, base: int) -> Parsed:
    sig, physptr, length, rev, _csum, feature1 = struct.unpack_from("<4sIBBBB", raw, 0)
    assert (sig, length, rev, feature1) == (b"_MP_", 1, 4, 0)
    assert sum(raw[:16]) % 256 == 0
    table = raw[physptr - base :]
    sig, base_len, rev, _c, oem, product, _oemp, _oems, count, lapic, ext_len, _x, _r = (
        struct.unpack_from("<4sHBB8s12sIHHIHBB", table, 0)
    )
    assert (sig, rev, ext_len, oem, product) == (b"PCMP", 4, 0, b"KVMKIT  ", b"KVMKIT VM   ")
    assert sum(table[:base_len]) % 256 == 0
    assert physptr - base + base_len == len(raw)
    out = Parsed(lapic)
    pos = 44
    for _ in range(count):
        kind = table[pos]
        out.types.append(kind)
        if kind == 0:
            _t, apic_id, version, flags = struct.unpack_from("<BBBB", table, pos)
            assert version == 0x14
            out.cpus.append((apic_id, flags))
        elif kind == 1:
            out.buses.append((table[pos + 1], table[pos + 2 : pos + 8]))
        elif kind == 2:
            _t, ioapic_id, _v, flags, addr = struct.unpack_from("<BBBBI", table, pos)
            out.ioapics.append((ioapic_id, flags, addr))
        else:
            entry = struct.unpack_from("<xBHBBBB", table, pos)
            (out.ints if kind == 3 else out.lints).append(entry)
        pos += SIZES[kind]
    assert pos == base_len
    return out


def test_default_table_for_four_cpus():
    raw = build_mptable(4, BASE, ioapic_id=4)
    assert len(raw) == mptable_size(4, 15)
    t = parse(raw, BASE)
    assert t.lapic == 0xFEE00000
    assert t.cpus == [(0, 3), (1, 1), (2, 1), (3, 1)]  # all enabled, CPU 0 boots
    assert t.buses == [(0, b"ISA   ")]
    assert t.ioapics == [(4, 1, 0xFEC00000)]
    assert t.types == sorted(t.types)  # entries in type order
    # ISA IRQs on the pin of the same number (KVM's default routing), no IRQ 2
    assert [(irq, pin) for _k, _f, _b, irq, _a, pin in t.ints] == [
        (i, i) for i in range(16) if i != 2
    ]
    assert all(
        kind == 0 and flags == 0 and bus == 0 and apic == 4
        for kind, flags, bus, _i, apic, _p in t.ints
    )
    assert t.lints == [(3, 0, 0, 0, 0xFF, 0), (1, 0, 0, 0, 0xFF, 1)]  # ExtINT LINT0, NMI LINT1


def test_device_irqs_are_edge_triggered_active_high():
    # irqfds pulse: a level pin would lose a pulse that comes while one is in service
    t = parse(build_mptable(1, BASE, ioapic_id=1, extra_irqs=[5, 16, 23]), BASE)
    by_pin = {pin: (irq, flags) for _k, flags, _b, irq, _a, pin in t.ints}
    assert by_pin[5] == (5, 0) and by_pin[16] == (16, 0) and by_pin[23] == (23, 0)
    assert by_pin[4] == (4, 0) and len(by_pin) == 15 + 2  # IRQ 5 replaced, 16 and 23 added


def test_irq0_can_go_to_pin_2():
    t = parse(build_mptable(1, BASE, ioapic_id=1, irq0_pin=2), BASE)
    pins = {irq: pin for _k, _f, _b, irq, _a, pin in t.ints}
    assert pins[0] == 2 and 2 not in pins and 0 not in pins.values()


def test_other_addresses_and_irq_sets():
    t = parse(
        build_mptable(
            2, 0xF0000, ioapic_id=9, ioapic_addr=0xFEC10000, lapic_addr=0xFEE10000, isa_irqs=[0, 4]
        ),
        0xF0000,
    )
    assert t.lapic == 0xFEE10000 and t.ioapics == [(9, 1, 0xFEC10000)]
    assert [irq for _k, _f, _b, irq, _a, _p in t.ints] == [0, 4]


def test_largest_table_fits_in_the_reserved_legacy_area():
    raw = build_mptable(254, BASE, ioapic_id=254, extra_irqs=range(16, 24))
    assert len(parse(raw, BASE).cpus) == 254
    assert BASE + len(raw) <= 0x100000


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"nr_cpus": 0}, "0 vCPUs"),
        ({"nr_cpus": 255}, "1 to 254"),
        ({"ioapic_id": 1}, "collides with the CPUs' APIC ids 0-1"),
        ({"base_gpa": BASE + 8}, "not 16-byte aligned"),
        ({"extra_irqs": [2]}, "device GSI 2 is not usable"),
        ({"extra_irqs": [24]}, "device GSI 24"),
        ({"extra_irqs": [7, 7]}, "given twice"),
        ({"isa_irqs": [16]}, "ISA IRQ 16"),
        ({"irq0_pin": 1}, "pin 0 or 2"),
    ],
)
def test_bad_requests(kw, match):
    args = {"nr_cpus": 2, "base_gpa": BASE, "ioapic_id": 2, **kw}
    with pytest.raises(ConfigError, match=match):
        build_mptable(**args)
