"""Hostile virtio drivers (issue 14, part 8): a small assembly guest
(kvmkit/guests/src/virtio_hostile.S) drives a real virtio-rng on /dev/kvm with one
flaw each. The VMM keeps running; the device sets DEVICE_NEEDS_RESET (or ignores the
queue), and after the driver resets it, it serves a valid request again.

The guest's exit status is phase1 << 4 | phase2, each 1 (the device set
NEEDS_RESET), 2 (it returned the buffer) or 3 (it did nothing)."""

import pytest

from kvmkit.machine import build_for_boot
from kvmkit.machine.config import MachineConfig
from kvmkit.machine.resources import EntropySpec

REFUSED_THEN_WORKS = 0x12
IGNORED_THEN_WORKS = 0x32
WORKS_TWICE = 0x22

CASES = [
    (0, "valid request", WORKS_TWICE, None),
    (1, "descriptor loop", REFUSED_THEN_WORKS, "a loop"),
    (2, "buffer outside RAM", REFUSED_THEN_WORKS, "is not inside guest RAM"),
    (3, "wrapping length", REFUSED_THEN_WORKS, "wraps the address space"),
    (4, "queue size 3", REFUSED_THEN_WORKS, "queue size 3 is not a power of two"),
    (5, "notify before DRIVER_OK", IGNORED_THEN_WORKS, None),
    (6, "config write storm", WORKS_TWICE, None),
    (7, "avail index far ahead", REFUSED_THEN_WORKS, "runs 1000 entries ahead"),
    (8, "used ring over the descriptors", REFUSED_THEN_WORKS, "overlaps the used ring"),
]


@pytest.mark.parametrize("case, what, expected, error", CASES, ids=[c[1] for c in CASES])
def test_hostile_driver(case, what, expected, error):
    config = MachineConfig(
        guest="virtio_hostile", guest_arg=case, memory_bytes=16 << 20, console="none"
    )
    resources = config.resources().with_entropy(EntropySpec())
    with build_for_boot(resources) as machine:
        result = machine.run()
        rng = machine.devices["rng"]
        state = rng.save_state().transport
    assert result.status == expected, f"{what}: {result.reason} (status {result.status:#x})"
    if error is None:
        assert state.errors == 0, state.last_error
    else:
        assert state.errors >= 1 and error in state.last_error, state.last_error
    assert state.status == 0xF  # the valid request after the reset left it live
    assert rng.bytes_given == 16 * (2 if expected == WORKS_TWICE else 1)


def test_a_machine_with_every_device_closes_every_fd(tmp_path):
    from kvmkit.machine.resources import BalloonSpec, DriveSpec

    from .conftest import open_fds

    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(1 << 20))
    before = open_fds()
    config = MachineConfig(guest="hello", memory_bytes=16 << 20, console="none")
    resources = (
        config.resources()
        .with_drive(DriveSpec("a", str(disk)))
        .with_drive(DriveSpec("b", str(disk), read_only=True))
        .with_entropy(EntropySpec())
        .with_balloon(BalloonSpec(stats_interval_s=1))
    )
    with build_for_boot(resources) as machine:
        assert machine.run().status == 0
        assert {p.id: p.gsi for p in machine.description.devices if p.bus == "mmio"} == {
            "blk0": 5,
            "blk1": 6,
            "rng": 7,
            "balloon": 9,
        }
    assert open_fds() == before
