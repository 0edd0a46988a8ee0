"""Faults in a virtio-blk drive's backing file (sites blk.read, blk.write): the Linux
guest sees an I/O error on that request, the VMM runs on, and the next request works.
Uses the session's virtio snapshot (tests/conftest.py), restored per test."""

import errno

import pytest

from kvmkit.faults import FaultPlan, FaultRule, active_plan
from kvmkit.guests.linux.pattern import fnv_hex, pattern
from kvmkit.testing.linux import restore_guest


@pytest.fixture
def guest(virtio_snapshot, virtio_disks):
    g = restore_guest(
        virtio_snapshot.path, drive_paths={k: str(v) for k, v in virtio_disks.items()}
    )
    try:
        yield g
    finally:
        g.close()


@pytest.mark.parametrize("err", [errno.EIO, errno.ENOSPC], ids=["EIO", "ENOSPC"])
def test_a_failed_write_is_an_io_error_in_the_guest_and_the_next_one_works(
    guest, virtio_disks, err
):
    blk = guest.machine.devices["blk0"]
    with active_plan(FaultPlan([FaultRule("blk.write", err)])) as plan:
        failed = guest.command("blk-write /dev/vda 0 65536 5")
    assert plan.injected, "the write never reached the backing file"
    assert failed.rc != 0 and "pwrite: EIO" in failed.text, failed.text
    assert blk.request_errors >= 1 and guest.machine.alive
    wrote = guest.command("blk-write /dev/vda 0 65536 5")
    assert wrote.rc == 0, wrote.text
    assert virtio_disks["data"].read_bytes()[:65536] == pattern(5, 0, 65536)


def test_a_failed_read_is_an_io_error_in_the_guest_and_the_next_one_works(guest):
    with active_plan(FaultPlan([FaultRule("blk.read", errno.EIO)])) as plan:
        failed = guest.command("blk-read /dev/vdb 0 65536")
    assert plan.injected
    assert failed.rc != 0 and "pread: EIO" in failed.text, failed.text
    read = guest.command("blk-read /dev/vdb 0 65536")
    assert read.rc == 0
    from tests.conftest import VIRTIO_BASE_SEED

    assert read.value("fnv") == fnv_hex(pattern(VIRTIO_BASE_SEED, 0, 65536))
