"""The device manager's bookkeeping: ids, PIO ranges, MMIO slots and GSIs (no KVM: a
machine without an in-kernel irqchip gets recording lines; the KVM side of lines and
doorbells is tested in tests/kvm/test_interrupts.py)."""

import pytest

from kvmkit.devices import BusError, PostCode
from kvmkit.devices.irq import LevelRecorder
from kvmkit.errors import KvmkitError
from kvmkit.machine.device_manager import MMIO_BASE, MMIO_LIMIT, MMIO_SLOT, DeviceManager
from kvmkit.machine.interrupts import POOL_GSIS, GsiPool


class Dev(PostCode):
    def __init__(self, name):
        super().__init__(name=name)


def manager():
    return DeviceManager(vm=None, events=None, irqchip=False)


def test_pio_devices_get_their_ranges_and_overlaps_are_refused_naming_both():
    dm = manager()
    dm.add_pio(Dev("a"), 0x80, 1)
    dm.add_pio(Dev("b"), 0x3F8, 8, gsi=4)
    assert dm.placements["b"].gsi == 4 and dm.pio_bus.find(0x3FD).device.name == "b"
    with pytest.raises(BusError, match=r"c: port range 0x3fc-0x403 overlaps b at 0x3f8-0x3ff"):
        dm.add_pio(Dev("c"), 0x3FC, 8)


def test_ids_are_unique():
    dm = manager()
    dm.add_pio(Dev("blk0"), 0x80, 1)
    with pytest.raises(KvmkitError, match="two devices have the id 'blk0'"):
        dm.add_mmio(Dev("blk0"), 0x200)


def test_mmio_slots_are_allocated_in_order_in_the_hole_and_run_out_cleanly():
    dm = manager()
    bases = [dm.add_mmio(Dev(f"v{i}"), 0x200) for i in range(3)]
    assert bases == [MMIO_BASE, MMIO_BASE + MMIO_SLOT, MMIO_BASE + 2 * MMIO_SLOT]
    assert dm.add_mmio(Dev("big"), MMIO_SLOT + 1) == MMIO_BASE + 3 * MMIO_SLOT
    assert dm.add_mmio(Dev("after"), 1) == MMIO_BASE + 5 * MMIO_SLOT  # big took two slots
    assert dm.add_mmio(Dev("placed"), 0x200, at=0xE0000000) == 0xE0000000  # a restore
    dm.mmio.next = MMIO_LIMIT - MMIO_SLOT
    dm.add_mmio(Dev("last"), 0x200)
    with pytest.raises(KvmkitError, match="no MMIO space left"):
        dm.add_mmio(Dev("none"), 0x200)


def test_gsis_come_from_the_pool_and_fixed_ones_are_legacy_irqs():
    pool = GsiPool()
    assert pool.take("serial0", 4) == 4
    assert [pool.take(f"v{i}") for i in range(3)] == list(POOL_GSIS[:3])
    with pytest.raises(KvmkitError, match="IRQ 4 is already serial0's"):
        pool.take("other", 4)
    with pytest.raises(KvmkitError, match=f"IRQ {POOL_GSIS[0]} is already v0's"):
        pool.take("other", POOL_GSIS[0])
    for i in range(3, len(POOL_GSIS)):
        pool.take(f"v{i}")
    with pytest.raises(KvmkitError, match="no interrupt line left"):
        pool.take("one-too-many")


def test_without_an_irqchip_lines_record_their_level():
    dm = manager()
    line = dm.irq_line("serial0", 4)
    assert isinstance(line, LevelRecorder) and line.gsi == 4
    line.set_level(True)
    assert line.level and list(line.levels) == [True]
