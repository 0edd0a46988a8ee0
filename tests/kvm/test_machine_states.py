"""A machine's states as a controller sees them: built but not running, and a lazily
restored machine that is snapshotted (or migrated) before the guest has touched all
of its memory: the rest is loaded first, never waited for forever. Also the control
half of the hide-mode probe: with its host mapping, the probe guest runs."""

import threading
import time

import pytest

from kvmkit.control.snapshots import restore_snapshot, take_snapshot
from kvmkit.errors import KvmkitError
from kvmkit.hostcheck.probes import gmem_probe

from .snapshot_helpers import Running, assert_counter_output, counter_config


def test_a_pause_before_the_run_holds_the_vcpus_at_their_first_kvm_run(vm_factory):
    """An API client may ask before run() has started the vCPUs (its socket is up
    first): the pause holds, no guest instruction runs until the resume."""
    import threading

    machine = vm_factory("counter", memory="16M", arg=5)
    assert machine.status()["state"] == "created"
    machine.pause()
    assert machine.status()["state"] == "paused"
    results = []
    t = threading.Thread(target=lambda: results.append(machine.run()))
    t.start()
    time.sleep(0.2)
    assert machine.paused and machine.post.writes == 0 and machine.serial.transmitted == 0
    machine.resume()
    t.join(30)
    assert results[0].status == 0, results[0].reason
    assert machine.serial.transmitted > 0
    machine.stop(0, "over")
    with pytest.raises(KvmkitError, match="not running, so it cannot be paused"):
        machine.pause()


def test_a_snapshot_of_a_lazy_restore_loads_the_rest_first(tmp_path):
    """Without prefetch only what the guest touches is loaded; a snapshot then loads the
    rest itself instead of waiting for the guest to touch every page."""
    steps = 400
    run = Running(counter_config(tmp_path / "a.txt", steps, backend="memfd"))
    time.sleep(0.1)
    take_snapshot(run.machine, tmp_path / "one.snap")
    run.kill()
    lazy = restore_snapshot(
        tmp_path / "one.snap", lazy=True, prefetch=False, console=str(tmp_path / "b.txt")
    )
    thread = threading.Thread(target=lazy.run, daemon=True)
    thread.start()
    time.sleep(0.05)
    report = take_snapshot(lazy, tmp_path / "two.snap")  # returns: before, it could hang here
    assert report.file_bytes > 0 and lazy.lazy is not None and lazy.lazy.done.is_set()
    lazy.stop(0, "snapshotted")
    thread.join(10)
    lazy.close()
    with restore_snapshot(tmp_path / "two.snap", console=str(tmp_path / "c.txt")) as again:
        assert again.run().status == 0
    text = "".join((tmp_path / n).read_text() for n in ("a.txt", "b.txt", "c.txt"))
    assert_counter_output(text, 1, steps)


def test_the_hide_probe_guest_runs_with_its_host_mapping():
    """The probe that refuses --hide-guest-memory on this host must itself be sound: the
    same guest, with the mapping kept, runs and reads its memory."""
    result = gmem_probe(host_mapped=True)
    assert result.ok, result.detail
    assert result.detail == "the guest ran and read its memory"


@pytest.mark.parametrize("irqchip", [False, True])
def test_the_state_a_migration_announces_is_the_state_it_captures(irqchip):
    """A migration's header names its capabilities before the capture: the items it
    predicts must be the capture's own."""
    from kvmkit.machine import MachineConfig
    from kvmkit.snapshot.machine_state import ITEM_CAPS, capture_state, items_to_capture

    config = MachineConfig(guest="counter", memory_bytes=16 << 20, console="none", irqchip=irqchip)
    run = Running(config)
    try:
        predicted = items_to_capture(run.machine, run.machine.description)
        run.machine.pause()
        captured = capture_state(run.machine).items & set(ITEM_CAPS)
        run.machine.resume()
    finally:
        run.kill()
    assert predicted == captured
