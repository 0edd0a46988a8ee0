"""Dirty tracking beyond the selftest's checks (`kvmkit selftest dirty`, run under
pytest in test_selftest.py): a guest_memfd machine runs on from its own slots after
logging is turned off, and a dirty ring that KVM overflows (measured on PVM) is
detected, every populated page counted dirty, and the vCPU not wedged."""

import time

import pytest

from kvmkit.memory.dirty_log import run_bytes
from kvmkit.testing.dirty_bench import DirtyingGuest


def test_a_guest_memfd_machine_runs_on_after_logging_is_turned_off():
    with DirtyingGuest("guest_memfd", 10) as d:
        machine = d.machine
        machine.pause()
        d.log.stop()  # the guest_memfd slots are bound again
        populated = machine.memory.populated_bytes()
        machine.resume()
        time.sleep(0.2)
        assert machine.status()["state"] == "running"
        assert machine.memory.populated_bytes() > populated  # its writes land in the file


@pytest.mark.parametrize("ring", [0, 64 << 10], ids=["bitmap", "ring"])
def test_stopping_a_dirty_log_twice_is_harmless(ring):
    with DirtyingGuest("memfd", 10, ring=ring) as d:
        d.machine.pause()
        d.log.stop()
        d.log.stop()
        d.machine.resume()
        assert not d.log.active
        if ring:  # the rings are left empty: the next logging period starts clean
            assert d.machine.dirty_rings.collect() == []


def test_an_overflowing_dirty_ring_is_detected_and_everything_resent():
    """On PVM, KVM's instruction emulator writes a batch of pages without taking the
    ring's soft-full exit, so a guest writing with no exit in between (the unpaced
    dirtier) overflows a ring's 64 reserved entries (the kernel logs a WARNING in
    kvm_dirty_ring_push). kvmkit notices the lost entries, counts every populated page
    dirty, and the vCPU keeps running instead of exiting with DIRTY_RING_FULL forever."""
    with DirtyingGuest("memfd", 0, ring=16 << 10) as d:  # unpaced; 1024 entries
        machine, log = d.machine, d.log
        time.sleep(0.3)
        runs = log.collect()
        rings = machine.dirty_rings
        assert rings is not None and rings.full_exits > 0
        if log.ring_losses == 0:
            pytest.skip("KVM honoured the ring's soft limit here: nothing overflowed")
        extents, _ = machine.memory.populated_extents()
        assert run_bytes(runs) == sum(e.length for e in extents)
        harvested = rings.harvested
        time.sleep(0.2)
        log.collect()
        assert rings.harvested > harvested  # still harvesting: not wedged
        assert machine.status()["state"] == "running"
