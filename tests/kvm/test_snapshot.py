"""Snapshot and restore: exactness at awkward moments, another backend, the in-kernel
irqchip, and every failure a user can meet (a full disk, EIO, damaged or foreign
files, a host lacking a capability): refused clearly, with nothing lost."""

import errno
import json
import os
import random
import subprocess
import sys
import time

import pytest

from kvmkit.api.client import ApiCallError, call
from kvmkit.api.server import ApiServer
from kvmkit.arch.x86.host_cpu import host_cpu
from kvmkit.control.snapshots import restore_snapshot, take_snapshot
from kvmkit.devices.serial import COM1_BASE, UART_REGS
from kvmkit.errors import ConfigError, KvmkitError
from kvmkit.faults import FaultPlan, FaultRule, active_plan, load_plan
from kvmkit.kvm import KvmUnsupportedError
from kvmkit.machine import Machine
from kvmkit.snapshot.file import SnapshotFile, SnapshotWriteError, inspect

from .conftest import open_fds
from .snapshot_helpers import (
    Running,
    assert_counter_output,
    counter_config,
    kvmkit_cli,
    rewrite_header,
)

LSR = 5
LSR_VALUE = 0x60  # THRE | TEMT: what the guest's `in al, dx` must hold after completion
IN_AL_DX = 0xEC


class PauseOnLsrRead:
    """The machine's UART, but the Nth read of the line status register asks for a
    pause from inside the handler: the vCPU is then stopped in the middle of a port-in
    exit whose data KVM has not yet delivered."""

    def __init__(self, machine: Machine, nth: int) -> None:
        self.machine, self.uart, self.nth, self.reads = machine, machine.serial, nth, 0
        self.name, self.state_version = self.uart.name, self.uart.state_version

    def read(self, offset: int, size: int) -> int:
        if offset == LSR:
            self.reads += 1
            if self.reads == self.nth:
                self.machine.request_pause()
        return self.uart.read(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self.uart.write(offset, size, value)

    def save_state(self) -> dict:
        return self.uart.save_state()

    def load_state(self, state: dict) -> None:
        self.uart.load_state(state)


def _wait_paused(machine: Machine) -> None:
    deadline = time.monotonic() + 10
    while not machine.paused:
        assert time.monotonic() < deadline, "the machine never paused"
        time.sleep(0.001)


def restore_and_finish(snap, console, *extra: str) -> subprocess.CompletedProcess:
    p = kvmkit_cli("snapshot", "restore", str(snap), "--console", str(console), *extra)
    assert p.returncode == 0, p.stderr
    return p


@pytest.mark.parametrize("backend", ["guest_memfd", "memfd"])
def test_snapshot_taken_mid_port_exit_completes_the_exit(tmp_path, backend):
    steps = 300

    def pause_on_37th_status_read(m: Machine) -> None:
        m.pio_bus.remove(COM1_BASE)
        m.pio_bus.add(COM1_BASE, UART_REGS, PauseOnLsrRead(m, nth=37))

    run = Running(
        counter_config(tmp_path / "a.txt", steps, backend=backend), setup=pause_on_37th_status_read
    )
    m = run.machine
    _wait_paused(m)
    regs = m.vcpus[0].get_regs()
    # KVM finished the `in al, dx` before parking: AL holds the status, RIP is past it.
    assert regs.rax & 0xFF == LSR_VALUE
    assert m.memory.read(regs.rip - 1, 1)[0] == IN_AL_DX
    take_snapshot(m, tmp_path / "mid.snap")
    assert m.paused  # a snapshot without resume leaves the machine paused
    run.kill()
    restore_and_finish(tmp_path / "mid.snap", tmp_path / "b.txt")
    text = (tmp_path / "a.txt").read_text() + (tmp_path / "b.txt").read_text()
    assert_counter_output(text, 1, steps)


def test_restore_into_another_backend(tmp_path):
    run = Running(counter_config(tmp_path / "a.txt", 400, vcpus=2, backend="guest_memfd"))
    time.sleep(0.1)
    take_snapshot(run.machine, tmp_path / "g.snap")
    run.kill()
    p = restore_and_finish(tmp_path / "g.snap", tmp_path / "b.txt", "--memory-backend", "memfd")
    assert "on memfd" in p.stderr and "restored     from" in p.stderr
    text = (tmp_path / "a.txt").read_text() + (tmp_path / "b.txt").read_text()
    assert_counter_output(text, 2, 400)


def test_irqchip_pit_and_lapic_state_round_trip_and_resume(tmp_path):
    steps = 300
    run = Running(counter_config(tmp_path / "a.txt", steps, irqchip=True))
    time.sleep(0.05)
    take_snapshot(run.machine, tmp_path / "i.snap", resume=True)
    assert run.finish().status == 0  # resume=True: the source runs on to its end
    source = (tmp_path / "a.txt").read_text()
    assert_counter_output(source, 1, steps)
    info = inspect(tmp_path / "i.snap")
    assert {"IRQCHIP", "PIT_STATE2"} <= set(info["header"]["requires"])
    assert info["machine"]["irqchip"] is True
    with SnapshotFile(tmp_path / "i.snap") as snap:
        assert {"lapic"} <= set(snap.saved.vcpus[0])
        assert {"pic_master", "pic_slave", "ioapic", "pit2", "clock"} <= set(snap.saved.vm)
        sent = snap.saved.devices["serial0"].state["transmitted"]
    restore_and_finish(tmp_path / "i.snap", tmp_path / "b.txt")
    assert_counter_output(source[:sent] + (tmp_path / "b.txt").read_text(), 1, steps)


def test_compressed_snapshot_restores(tmp_path):
    pytest.importorskip("zstandard")
    run = Running(counter_config(tmp_path / "a.txt", 300))
    time.sleep(0.05)
    report = take_snapshot(run.machine, tmp_path / "z.snap", compress_level=3)
    run.kill()
    assert report.file_bytes < report.memory_bytes  # counter pages are mostly zeros
    assert inspect(tmp_path / "z.snap")["memory"]["compressed_chunks"] > 0
    restore_and_finish(tmp_path / "z.snap", tmp_path / "b.txt")
    text = (tmp_path / "a.txt").read_text() + (tmp_path / "b.txt").read_text()
    assert_counter_output(text, 1, 300)


def test_short_writes_and_short_reads_are_completed(tmp_path):
    run = Running(counter_config(tmp_path / "a.txt", 300))
    time.sleep(0.05)
    with active_plan(load_plan(["snapshot.write:short@every=2"])) as plan:
        take_snapshot(run.machine, tmp_path / "s.snap")
    run.kill()
    assert len(plan.log) > 3
    with active_plan(load_plan(["snapshot.read:short@every=2"])) as plan:
        machine = restore_snapshot(tmp_path / "s.snap", console=str(tmp_path / "b.txt"))
    with machine:
        assert machine.run().status == 0
    assert len(plan.log) > 3
    text = (tmp_path / "a.txt").read_text() + (tmp_path / "b.txt").read_text()
    assert_counter_output(text, 1, 300)


# -- failures while writing ----------------------------------------------------------
@pytest.mark.parametrize("paused", [False, True])
def test_eio_while_writing_leaves_no_file_and_the_vm_as_it_was(tmp_path, paused):
    steps = 400
    run = Running(counter_config(tmp_path / "a.txt", steps))
    time.sleep(0.05)
    if paused:
        run.machine.pause()
    out = tmp_path / "snaps"
    out.mkdir()
    plan = FaultPlan([FaultRule("snapshot.write", errno.EIO, nth=4)])
    with active_plan(plan), pytest.raises(SnapshotWriteError) as e:
        take_snapshot(run.machine, out / "x.snap")
    assert plan.injected, "the fault was never reached"
    assert "Input/output error (EIO)" in str(e.value) and "no snapshot file was left" in str(
        e.value
    )
    assert list(out.iterdir()) == []
    assert run.machine.status()["state"] == ("paused" if paused else "running")
    run.machine.resume()
    assert run.finish().status == 0
    assert_counter_output((tmp_path / "a.txt").read_text(), 1, steps)  # nothing lost


@pytest.fixture
def tiny_fs(tmp_path):
    """A 64 KiB tmpfs: a real file system that runs out of space."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    p = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    if p.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root): {p.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


def test_enospc_through_the_cli_keeps_the_vm_running(tmp_path, tiny_fs):
    sock = str(tmp_path / "vm.sock")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kvmkit",
            "run",
            "--guest",
            "counter",
            "--guest-arg",
            "1500",
            "--memory",
            "64M",
            "--api-socket",
            sock,
            "--console",
            str(tmp_path / "a.txt"),
            "-q",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        while not os.path.exists(sock):
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.01)
        p = kvmkit_cli("snapshot", "create", "--socket", sock, "--out", str(tiny_fs / "vm.snap"))
        assert p.returncode == 1
        assert "No space left on device (ENOSPC)" in p.stderr
        assert f"free space on {tiny_fs}" in p.stderr
        assert list(tiny_fs.iterdir()) == []
        assert call(sock, "status")["state"] == "running"
    finally:
        assert proc.wait(60) == 0, proc.stderr.read()
    assert_counter_output((tmp_path / "a.txt").read_text(), 1, 1500)


# -- refusing damaged and foreign files ------------------------------------------------
@pytest.fixture(scope="module")
def good_snapshot(tmp_path_factory):
    d = tmp_path_factory.mktemp("good")
    run = Running(counter_config(d / "a.txt", 100000, vcpus=2))
    time.sleep(0.1)
    take_snapshot(run.machine, d / "good.snap")
    run.kill()
    return (d / "good.snap").read_bytes()


def _refused(path, match: str) -> str:
    before = open_fds()
    with pytest.raises(KvmkitError, match=match) as e:
        restore_snapshot(path, console="none")
    assert open_fds() == before  # nothing left open: no VM was started
    return str(e.value)


def test_flipped_bit_anywhere_is_refused_naming_the_section(tmp_path, good_snapshot):
    rng = random.Random(7)
    size = len(good_snapshot)
    positions = {0, 9, 13, 17, size - 1, size - 5, size - 20} | {
        rng.randrange(size) for _ in range(40)
    }
    for pos in sorted(positions):
        data = bytearray(good_snapshot)
        data[pos] ^= 1 << rng.randrange(8)
        path = tmp_path / f"flip{pos}.snap"
        path.write_bytes(data)
        message = _refused(path, r"header|section|magic|format version")
        assert "corrupted" in message or "not a kvmkit" in message or "version" in message, (
            pos,
            message,
        )


def test_truncated_file_is_refused(tmp_path, good_snapshot):
    size = len(good_snapshot)
    for cut in (0, 5, 100, 2000, size // 2, size - 3):
        path = tmp_path / f"cut{cut}.snap"
        path.write_bytes(good_snapshot[:cut])
        message = _refused(path, "truncated")
        assert f"at byte {cut}" in message


def test_wrong_magic_is_refused(tmp_path, good_snapshot):
    path = tmp_path / "magic.snap"
    path.write_bytes(b"QFI\xfb" + good_snapshot[4:])
    _refused(path, r"is not a kvmkit snapshot: it starts with b.QFI")


def test_newer_format_version_is_refused(tmp_path, good_snapshot):
    path = tmp_path / "new.snap"
    path.write_bytes(good_snapshot)
    rewrite_header(path, lambda h: None, version=99)
    _refused(path, "format version 99, newer than this kvmkit reads")


def test_other_architecture_and_vendor_are_refused(tmp_path, good_snapshot):
    path = tmp_path / "arch.snap"
    path.write_bytes(good_snapshot)
    rewrite_header(path, lambda h: h["host_cpu"].update(arch="aarch64"))
    _refused(path, "taken on 'aarch64'")
    path.write_bytes(good_snapshot)
    other = "AuthenticAMD" if host_cpu().vendor == "GenuineIntel" else "GenuineIntel"
    rewrite_header(path, lambda h: h["host_cpu"].update(vendor=other))
    _refused(path, f"{other} CPU")


def test_missing_capability_is_refused_by_name(tmp_path, good_snapshot):
    path = tmp_path / "cap.snap"
    path.write_bytes(good_snapshot)
    rewrite_header(path, lambda h: h["requires"].update(X86_SMM=1))
    with pytest.raises(KvmUnsupportedError, match="this host lacks KVM_CAP_X86_SMM"):
        restore_snapshot(path, console="none")


def test_cli_refusal_is_one_line_and_starts_nothing(tmp_path, good_snapshot):
    path = tmp_path / "bad.snap"
    data = bytearray(good_snapshot)
    data[len(data) // 2] ^= 0x10
    path.write_bytes(data)
    p = kvmkit_cli("snapshot", "restore", str(path), "--console", str(tmp_path / "c.txt"))
    assert p.returncode == 1
    assert p.stderr.startswith("kvmkit: error: snapshot ") and "Traceback" not in p.stderr
    assert "checksum mismatch" in p.stderr and "memory data is corrupted" in p.stderr
    assert not (tmp_path / "c.txt").exists() or (tmp_path / "c.txt").read_text() == ""


def test_inspect_shows_sections_and_verifies(tmp_path, good_snapshot):
    path = tmp_path / "good.snap"
    path.write_bytes(good_snapshot)
    p = kvmkit_cli("snapshot", "inspect", str(path))
    assert p.returncode == 0, p.stderr
    assert "kvmkit state stream, format 1" in p.stdout
    assert "2 vCPU, 64 MiB guest_memfd, guest counter" in p.stdout
    assert "vCPU state" in p.stdout and "memory index" in p.stdout and "verified" in p.stdout
    info = json.loads(kvmkit_cli("snapshot", "inspect", str(path), "--json").stdout)
    assert info["memory"]["chunks"] >= 1 and info["machine"]["vcpus"] == 2


# -- the control socket -------------------------------------------------------------------
def test_api_socket_is_private_and_answers_errors_clearly(tmp_path):
    run = Running(counter_config(tmp_path / "a.txt", 100000))
    server = ApiServer(tmp_path / "vm.sock", run.machine).start()
    try:
        sock = str(tmp_path / "vm.sock")
        assert os.stat(sock).st_mode & 0o777 == 0o600
        assert call(sock, "status")["state"] == "running"
        assert call(sock, "pause")["state"] == "paused"
        assert call(sock, "resume")["state"] == "running"
        with pytest.raises(ApiCallError, match="unknown command 'reboot': use one of status"):
            call(sock, "reboot")
        with pytest.raises(ApiCallError, match="snapshot: field 'path' is missing"):
            call(sock, "snapshot")
        wrong = [  # a wrong type is named, never guessed at; nothing else is taken
            ({"path": 5}, "field 'path': must be a string, not an integer"),
            ({"path": "x", "resume": "yes"}, "field 'resume': must be true or false"),
            ({"path": "x", "compress": 30}, "field 'compress'"),
            ({"path": "x", "bogus": 1}, "unknown field 'bogus'"),
        ]
        for args, message in wrong:
            with pytest.raises(ApiCallError, match=message):
                call(sock, "snapshot", args)
        with pytest.raises(ApiCallError, match="pause: unknown field 'bogus'"):
            call(sock, "pause", {"bogus": 1})
        with pytest.raises(ApiCallError, match="migrate: field 'to': must be a string"):
            call(sock, "migrate", {"to": 5})
        with pytest.raises(ApiCallError, match="directory .* does not exist"):
            call(sock, "snapshot", {"path": str(tmp_path / "no" / "x.snap")})
        assert call(sock, "status")["state"] == "running"
    finally:
        server.close()
        run.kill()
    assert not os.path.exists(tmp_path / "vm.sock")


# -- lazy restore ----------------------------------------------------------------------------
@pytest.mark.parametrize("prefetch", [False, True])
def test_lazy_restore_serves_guest_faults_and_continues(tmp_path, prefetch):
    steps = 600
    run = Running(counter_config(tmp_path / "a.txt", steps, vcpus=2, backend="memfd"))
    time.sleep(0.1)
    take_snapshot(run.machine, tmp_path / "l.snap")
    run.kill()
    m = restore_snapshot(
        tmp_path / "l.snap", lazy=True, prefetch=prefetch, console=str(tmp_path / "b.txt")
    )
    with m:
        lazy = m.lazy
        assert m.run().status == 0
        if not prefetch:  # everything the guest got, it got through its own faults
            assert lazy.stats.faults > 0 and lazy.stats.windows_on_demand > 0
            assert lazy.stats.windows_prefetched == 0
    text = (tmp_path / "a.txt").read_text() + (tmp_path / "b.txt").read_text()
    assert_counter_output(text, 2, steps)


def test_lazy_restore_of_guest_memfd_memory_is_refused_with_the_way_out(tmp_path, good_snapshot):
    path = tmp_path / "g.snap"
    path.write_bytes(good_snapshot)
    before = open_fds()
    with pytest.raises(ConfigError, match="--memory-backend memfd --lazy"):
        restore_snapshot(path, lazy=True, console="none")
    assert open_fds() == before
