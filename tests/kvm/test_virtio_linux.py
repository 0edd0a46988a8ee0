"""virtio-mmio devices under the project's Linux test kernel: virtio-blk, virtio-rng
and virtio-balloon as a Linux driver uses them, checked from the host side.

One boot per session (`virtio_snapshot` in tests/conftest.py: the test kernel with
two drives, an rng and a balloon, snapshotted at its prompt); each test restores it
in milliseconds, with its own copy of the disks (`virtio_disks`; `--drive-path`,
here `drive_paths=`), so tests never share disk contents.
"""

import io
import os
import shutil
import time
from pathlib import Path

import pytest

from kvmkit.control.snapshots import restore_snapshot, take_snapshot
from kvmkit.guests.linux.pattern import fnv_hex, pattern
from kvmkit.testing.linux import LinuxGuest, restore_guest
from tests.conftest import VIRTIO_BASE_BYTES, VIRTIO_DATA_BYTES

DATA_BYTES = VIRTIO_DATA_BYTES
BASE_BYTES = VIRTIO_BASE_BYTES


def restore(snapshot: Path, disks: dict[str, Path]) -> LinuxGuest:
    return restore_guest(snapshot, drive_paths={k: str(v) for k, v in disks.items()})


@pytest.fixture
def disks(virtio_disks):
    return virtio_disks


@pytest.fixture
def guest(virtio_snapshot, disks):
    g = restore(virtio_snapshot.path, disks)
    try:
        yield g
    finally:
        g.close()


def test_the_devices_are_where_the_command_line_says(guest):
    cmdline = guest.command("cmdline").text
    entries = [w for w in cmdline.split() if w.startswith("virtio_mmio.device=")]
    assert entries == [
        f"virtio_mmio.device=4K@{p.base:#x}:{p.gsi}"
        for p in guest.machine.device_manager.placements.values()
        if p.bus == "mmio"
    ]
    assert [d.id for d in guest.machine.description.devices if d.bus == "mmio"] == [
        "blk0",
        "blk1",
        "rng",
        "balloon",
    ]
    assert guest.machine.description.device("blk1").config["drive_id"] == "base"


def test_o_direct_pattern_written_by_the_guest_is_in_the_file(guest, disks):
    offset, length, seed = 3 << 20, 4 << 20, 7
    wrote = guest.command(f"blk-write /dev/vda {offset} {length} {seed}")
    assert wrote.rc == 0, wrote.text
    expected = pattern(seed, 0, length)
    assert wrote.value("fnv") == fnv_hex(expected)
    with open(disks["data"], "rb") as f:
        f.seek(offset)
        assert f.read(length) == expected  # byte for byte, on the host
    read = guest.command(f"blk-read /dev/vda {offset} {length}")
    assert (read.rc, read.value("fnv")) == (0, fnv_hex(expected))
    assert guest.command("blk-flush /dev/vda").rc == 0  # cache=writeback: an fsync
    size = guest.command("blk-size /dev/vda")
    assert size.value("bytes") == str(DATA_BYTES)


def test_the_guest_reads_the_serial_and_the_read_only_flag(guest):
    assert guest.command("cat /sys/block/vda/serial").text.strip() == "KVMKIT-DATA"
    assert guest.command("cat /sys/block/vdb/ro").text.strip() == "1"
    assert guest.command("cat /sys/block/vda/ro").text.strip() == "0"


def test_a_read_only_drive_refuses_writes_and_keeps_its_bytes(guest, disks):
    before = disks["base"].read_bytes()
    wrote = guest.command("blk-write /dev/vdb 0 4096 1")
    assert wrote.rc != 0 and "error" in wrote.text
    read = guest.command(f"blk-read /dev/vdb 0 {BASE_BYTES}")
    assert (read.rc, read.value("fnv")) == (0, fnv_hex(before))
    assert disks["base"].read_bytes() == before


def test_64_bytes_from_hwrng(guest):
    first = guest.command("rng 64")
    second = guest.command("rng 64")
    assert first.rc == 0 and len(first.value("rng")) == 128
    assert first.value("rng") != second.value("rng")
    assert guest.machine.devices["rng"].bytes_given >= 128


def _wait(predicate, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen in {timeout_s:g} s")
        time.sleep(0.1)


def test_balloon_inflate_frees_backing_memory_and_deflate_gives_it_back(guest):
    machine = guest.machine
    memory = machine.memory
    assert memory.backend_name == "guest_memfd"
    memory.populate_file_range(0, memory.size_bytes)  # every page backed: easy to see drop
    balloon = machine.devices["balloon"]
    total_kb = int(guest.command("meminfo").value("memtotal_kb"))
    before = memory.populated_bytes()
    n_mib = 16
    balloon.set_target(n_mib)
    _wait(lambda: balloon.actual_pages == n_mib * 256, "inflating 16 MiB")
    after = memory.populated_bytes()
    freed_mib = (before - after) / (1 << 20)
    assert n_mib - 1 <= freed_mib <= n_mib + 1, (before, after)
    inflated_total = int(guest.command("meminfo").value("memtotal_kb"))
    assert total_kb - inflated_total == n_mib * 1024  # the guest lost them
    balloon.set_target(0)
    _wait(lambda: balloon.actual_pages == 0, "deflating")
    assert int(guest.command("meminfo").value("memtotal_kb")) == total_kb
    assert balloon.save_state().inflated_pages >= n_mib * 256


def test_snapshot_with_a_disk_write_in_flight_loses_no_byte(guest, disks, tmp_path):
    offset, length, seed = 8 << 20, 24 << 20, 42
    blk = guest.machine.devices["blk0"]
    start = blk.requests
    guest.send(f"blk-write /dev/vda {offset} {length} {seed}")
    _wait(lambda: blk.requests >= start + 4, "the guest's first writes")
    snap = tmp_path / "in-flight.snap"
    take_snapshot(guest.machine, snap)  # paused: the event loop holds no request
    assert "written=" not in guest.console  # the write was still going on
    guest.close()
    copy = tmp_path / "data-at-snapshot.img"
    shutil.copyfile(disks["data"], copy)  # the disk as the snapshot knows it
    restored = restore(snap, {"data": copy, "base": disks["base"]})
    try:
        done = restored.wait_for("written=", 120)
        assert done.split("fnv=")[1] == fnv_hex(pattern(seed, 0, length))
        with open(copy, "rb") as f:
            f.seek(offset)
            assert f.read(length) == pattern(seed, 0, length)
        read = restored.command(f"blk-read /dev/vda {offset} {length}")
        assert read.value("fnv") == fnv_hex(pattern(seed, 0, length))
    finally:
        restored.close()


def test_a_missing_backing_file_on_restore_is_one_clear_error(virtio_snapshot, disks):
    from kvmkit.errors import ConfigError

    gone = str(disks["data"]) + ".gone"
    match = r"drive data: cannot open .*\.gone: .*; give the drive's file in its place with"
    with pytest.raises(ConfigError, match=match + " --drive-path data=PATH"):
        restore_snapshot(
            virtio_snapshot.path, console_stream=io.BytesIO(), drive_paths={"data": gone}
        )
    assert os.path.exists(disks["data"])


def test_a_drive_path_for_a_drive_the_snapshot_lacks_is_refused(virtio_snapshot, disks):
    from kvmkit.errors import ConfigError

    with pytest.raises(ConfigError, match=r"drive 'dtaa': the saved machine has no such drive"):
        restore_snapshot(
            virtio_snapshot.path,
            console_stream=io.BytesIO(),
            drive_paths={"dtaa": str(disks["data"])},
        )


def test_a_restored_machine_snapshots_the_disk_it_was_given(guest, disks, tmp_path):
    """After a restore onto a copy of a disk, the machine's own next snapshot names the
    copy: restoring that one without --drive-path must not reopen the original."""
    from kvmkit.snapshot.file import SnapshotFile

    snap = tmp_path / "again.snap"
    take_snapshot(guest.machine, str(snap), resume=True)
    with SnapshotFile(snap) as saved:
        paths = {
            r.config["drive_id"]: r.config["path"]
            for r in saved.saved.description.devices
            if r.kind == "virtio-blk"
        }
    assert paths == {k: str(v) for k, v in disks.items()}


def migrate_during(
    guest: LinuxGuest, command: str, disks, tmp_path: Path, bandwidth_bps: int = 0
) -> LinuxGuest:
    """Send `command`, migrate the guest in-process once its disk I/O is under way
    (the target uses the same disk files), and return the guest on the target."""
    import threading

    from kvmkit.migration import IncomingMigration
    from kvmkit.migration.source import migrate

    address = f"unix:{tmp_path / 'in.sock'}"
    incoming = IncomingMigration(address)
    received: list[LinuxGuest] = []

    def receive() -> None:
        machine = incoming.receive(
            console_stream=io.BytesIO(), drive_paths={k: str(v) for k, v in disks.items()}
        )
        incoming.commit()
        incoming.close()
        incoming.confirm_when_running()
        received.append(LinuxGuest(machine))

    target = threading.Thread(target=receive, daemon=True)
    target.start()
    blk = guest.machine.devices["blk0"]
    start = blk.requests
    guest.send(command)
    _wait(lambda: blk.requests >= start + 4, "the guest's first requests")
    migrate(guest.machine, address, bandwidth_bps=bandwidth_bps)
    assert "kvmkit-init: done" not in guest.console.split(command)[-1]  # still under way
    target.join(60)
    assert received, "the target did not start"
    return received[0]


def test_live_migration_with_a_disk_write_in_flight_loses_no_byte(guest, disks, tmp_path):
    from kvmkit.faults import FaultPlan, FaultRule, active_plan

    offset, length, seed = 4 << 20, 24 << 20, 11
    # 100 ms more per write request (a slow disk): the write (48 requests) outlasts
    # the migration whatever the host's load
    slow_disk = FaultPlan([FaultRule("blk.write", action="delay", delay_s=0.1, times=0)])
    with active_plan(slow_disk):
        command = f"blk-write /dev/vda {offset} {length} {seed}"
        moved = migrate_during(guest, command, disks, tmp_path)
        try:
            done = moved.wait_for("written=", 120)
        except BaseException:
            moved.close()
            raise
    try:
        expected = pattern(seed, 0, length)
        assert done.split("fnv=")[1] == fnv_hex(expected)
        with open(disks["data"], "rb") as f:
            f.seek(offset)
            assert f.read(length) == expected
        assert moved.machine.description.device("blk0").config["drive_id"] == "data"
    finally:
        moved.close()


def test_balloon_statistics_and_free_page_reporting(test_kernel):
    """Its own boot: the balloon's features are negotiated when the driver probes.
    Linux reports free blocks of pageblock order (4 MiB in the test kernel) that are
    freed after the driver starts; a small guest frees few of those, so the guest is
    told to report from order 5 (128 KiB) up."""
    from kvmkit.machine import build_for_boot
    from kvmkit.machine.resources import BalloonSpec
    from kvmkit.testing.linux import READY, kernel_resources

    order = "page_reporting.page_reporting_order=5"
    resources = kernel_resources(test_kernel, cmdline=order).with_balloon(
        BalloonSpec(stats_interval_s=1, free_page_reporting=True)
    )
    guest = LinuxGuest(build_for_boot(resources, console=io.BytesIO()))
    try:
        guest.wait_for(READY, 180)
        balloon = guest.machine.devices["balloon"]
        _wait(lambda: "total_memory" in balloon.stats, "the first statistics")
        total = int(guest.command("meminfo").value("memtotal_kb")) * 1024
        # MemTotal grows as the kernel frees its init memory: fresh numbers follow it
        _wait(lambda: balloon.stats["total_memory"] == total, "statistics matching MemTotal")
        populated = guest.machine.memory.populated_bytes()
        assert guest.command("mem-touch 8").rc == 0  # 8 MiB in use, then freed
        assert guest.command("mem-free").rc == 0
        _wait(lambda: balloon.reported_bytes >= 2 << 20, "a free page report")
        assert guest.machine.memory.populated_bytes() < populated + (8 << 20)
        assert balloon.discard_errors == 0
    finally:
        guest.close()


def test_live_migration_with_a_disk_read_in_flight_moves_what_the_device_wrote(
    virtio_snapshot, disks, tmp_path
):
    """The device writes guest RAM (the read data, the used ring) behind KVM's dirty
    log; the migration must resend those pages or the target reads stale bytes."""
    from kvmkit.faults import FaultPlan, FaultRule, active_plan

    length, seed = 32 << 20, 23
    with open(disks["data"], "r+b") as f:
        f.write(pattern(seed, 0, length))
    # Each read request takes a second more (a slow disk), so the read (about 32 requests
    # of up to 1 MiB: half a minute) outlasts the migration, whose pre-copy at 4 MB/s
    # takes seconds while the device writes the guest's buffer.
    slow_disk = FaultPlan([FaultRule("blk.read", action="delay", delay_s=1.0, times=0)])
    with active_plan(slow_disk):
        source = restore(virtio_snapshot.path, disks)
        try:
            command = f"blk-read /dev/vda 0 {length}"
            moved = migrate_during(source, command, disks, tmp_path, bandwidth_bps=4_000_000)
        finally:
            source.close()
        try:
            done = moved.wait_for("read=", 120)
            assert done.split("fnv=")[1] == fnv_hex(pattern(seed, 0, length))
        finally:
            moved.close()


def test_a_replacement_disk_of_another_size_is_refused(virtio_snapshot, disks):
    from kvmkit.errors import ConfigError

    with open(disks["data"], "r+b") as f:
        f.truncate(1 << 20)
    with pytest.raises(ConfigError, match="drive data: .* holds 1048576 bytes, but the saved"):
        restore_snapshot(
            virtio_snapshot.path,
            console_stream=io.BytesIO(),
            drive_paths={k: str(v) for k, v in disks.items()},
        )


def test_cli_snapshot_restore_with_drive_path(virtio_snapshot, disks):
    """What a user types: `kvmkit snapshot restore SNAP --drive-path ID=PATH`; the
    guest's writes land in the named file."""
    import subprocess
    import sys

    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "kvmkit",
            "snapshot",
            "restore",
            str(virtio_snapshot.path),
            "--drive-path",
            f"data={disks['data']}",
            "--drive-path",
            f"base={disks['base']}",
        ],  # fmt: skip
        input=b"blk-write /dev/vda 1048576 65536 3\npoweroff\n",
        capture_output=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr.decode()
    assert b"written=65536" in p.stdout
    with open(disks["data"], "rb") as f:
        f.seek(1 << 20)
        assert f.read(65536) == pattern(3, 0, 65536)
    assert virtio_snapshot.data.read_bytes()[1 << 20 : (1 << 20) + 16] == bytes(16)  # untouched
    assert b"virtio-blk data: " + str(disks["data"]).encode() in p.stderr
