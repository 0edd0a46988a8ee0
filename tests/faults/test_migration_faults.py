"""A migration that fails in any phase leaves the source as it was: running (or
paused), every byte of guest RAM unchanged, dirty logging off and guest_memfd slots
bound as guest_memfd again; the target exits 1, having started nothing. The source
here is in this process (so its memory can be hashed) running a guest that never
writes memory; the target is a `kvmkit migrate receive` process."""

import errno
import hashlib
import os
import threading
import time

import pytest

from kvmkit.faults import active_plan, load_plan
from kvmkit.kvm import KvmError
from kvmkit.machine import Machine, MachineConfig, build_for_boot
from kvmkit.memory.layout import MIB
from kvmkit.migration import MigrationError, migrate
from tests.kvm.conftest import write_guest
from tests.kvm.migration_helpers import Target

MEMORY = 32 * MIB
FILLED = 8 * MIB  # written by the host before the guest starts
DATA_AT = 0x400000


def receiver(tmp_path, *extra: str) -> Target:
    """`kvmkit migrate receive` in its own process, on a unix socket in `tmp_path`."""
    return Target(tmp_path, f"unix:{tmp_path / 'incoming.sock'}", "--timeout", "60", *extra)


@pytest.fixture
def source(tmp_path, request):
    """A running machine whose guest spins without touching memory."""
    backend = getattr(request, "param", "guest_memfd")
    config = MachineConfig(
        guest=write_guest(tmp_path, "spin"),
        memory_bytes=MEMORY,
        memory_backend=backend,
        console="none",
    )
    machine = build_for_boot(config)
    machine.memory.write(DATA_AT, os.urandom(FILLED))
    thread = threading.Thread(target=machine.run, daemon=True)
    thread.start()
    while not machine.running:
        time.sleep(0.001)
    yield machine
    machine.stop(0, "test over")
    thread.join(10)
    machine.close()


def memory_hash(machine: Machine) -> str:
    """The data the host wrote (the guest's page tables are left out: the CPU sets their
    accessed bits whenever it walks them again, as after the slots were swapped)."""
    return hashlib.sha256(machine.memory.file_view(DATA_AT, FILLED)).hexdigest()


def assert_source_intact(machine: Machine, before: str, state: str = "running") -> None:
    assert machine.status()["state"] == state
    assert memory_hash(machine) == before
    for region in machine.memory.regions:  # logging off: KVM has no dirty bitmap for it
        with pytest.raises(KvmError) as e:
            machine.vm.get_dirty_log(region.slot, region.size // 4096)
        assert e.value.errno in (errno.ENOENT, errno.EINVAL), e.value


PHASE_FAULTS = [
    ("migration.send:disconnect@once", "handshake"),
    ("migration.recv:disconnect@once", "handshake"),
    ("migration.send:disconnect@nth=3,after=migration.precopy", "precopy"),
    ("migration.send:EPIPE@once,after=migration.stop-and-copy", "stop-and-copy"),
    ("migration.send:corrupt@once,after=migration.state", "state"),
    ("migration.recv:disconnect@once,after=migration.state", "state"),
    ("migration.send:disconnect@once,after=migration.commit", "commit"),
]


@pytest.mark.parametrize("source", ["guest_memfd", "memfd"], indirect=True)
@pytest.mark.parametrize(("rule", "phase"), PHASE_FAULTS)
def test_a_failure_in_any_phase_leaves_the_source_intact(tmp_path, source, rule, phase):
    before = memory_hash(source)
    target = receiver(tmp_path)
    with active_plan(load_plan([rule])) as plan:
        with pytest.raises(MigrationError) as e:
            migrate(source, target.listen)
    assert plan.injected, "the fault never fired"
    assert f"failed during {phase}" in str(e.value) and "running, unchanged" in str(e.value)
    assert_source_intact(source, before)
    code, err = target.wait(60), target.output
    assert code == 1 and "nothing was started here" in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize("source", ["guest_memfd", "memfd"], indirect=True)
def test_a_cut_after_the_go_leaves_the_source_paused_without_dirty_logging(tmp_path, source):
    """The go went out, then the line broke before the target said `running`: the source
    stays paused (the target may run), with dirty logging off and its guest_memfd slots
    bound again; the operator's resume runs it as before."""
    before = memory_hash(source)
    target = receiver(tmp_path)
    with active_plan(load_plan(["migration.recv:disconnect@once,after=migration.commit"])):
        with pytest.raises(MigrationError, match="failed after the go .* stays paused"):
            migrate(source, target.listen)
    assert_source_intact(source, before, state="paused")
    assert source.status()["paused_by"] == ["user"]
    assert source.resume()
    assert source.status()["state"] == "running"
    target.p.kill()
    target.wait(60)


def test_the_target_says_the_source_closed_the_connection(tmp_path, source):
    """A source that stops mid-stream (here: its connection drops during pre-copy) is
    named as such by the target, not as a truncated stream."""
    target = receiver(tmp_path)
    with active_plan(load_plan(["migration.send:disconnect@nth=3,after=migration.precopy"])):
        with pytest.raises(MigrationError):
            migrate(source, target.listen)
    code, err = target.wait(60), target.output
    assert code == 1 and "the source closed the connection at byte" in err, err
    assert "truncated" not in err and "Traceback" not in err


def test_a_paused_source_stays_paused_and_unchanged(tmp_path, source):
    source.pause()
    before = memory_hash(source)
    target = receiver(tmp_path)
    with active_plan(load_plan(["migration.send:disconnect@once,after=migration.state"])):
        with pytest.raises(MigrationError, match="this VM is paused, unchanged"):
            migrate(source, target.listen)
    assert_source_intact(source, before, "paused")
    assert target.wait(60) == 1


def test_a_target_that_refuses_leaves_the_source_running(tmp_path, source):
    """The target cannot build the machine (a hugetlb pool of 0 pages): it says why,
    the source reports it and carries on."""
    before = memory_hash(source)
    with open("/proc/sys/vm/nr_hugepages") as f:
        if int(f.read()) * 2 * MIB >= MEMORY:
            pytest.skip("this host has a hugetlb pool big enough for the machine")
    target = receiver(tmp_path, "--memory-backend", "hugetlb")
    with pytest.raises(MigrationError, match="the target refused: .*hugetlb"):
        migrate(source, target.listen)
    assert_source_intact(source, before)
    code, err = target.wait(60), target.output
    assert code == 1 and "hugetlb" in err, err


def test_a_killed_target_leaves_the_source_running(tmp_path, source):
    before = memory_hash(source)
    target = receiver(tmp_path)
    result: list[BaseException] = []

    def send() -> None:
        try:
            migrate(source, target.listen, bandwidth_bps=2 * MIB)  # 8 MiB: about 4 s
        except BaseException as e:
            result.append(e)

    sender = threading.Thread(target=send)
    sender.start()
    time.sleep(1.0)
    target.kill()
    sender.join(60)
    assert len(result) == 1 and isinstance(result[0], MigrationError), result
    assert "failed during precopy" in str(result[0]), result[0]
    assert_source_intact(source, before)


@pytest.mark.parametrize("source", ["guest_memfd", "memfd"], indirect=True)
def test_refused_dirty_logging_falls_back_to_stop_and_copy(tmp_path, source):
    """Where KVM refuses dirty logging, the machine still migrates, stop-and-copy, and
    the report says so."""
    before = memory_hash(source)
    target = receiver(tmp_path, "--api-socket", str(tmp_path / "target.api"))
    ioctl = "KVM_SET_USER_MEMORY_REGION2"
    with active_plan(load_plan([f"ioctl:{ioctl}:EINVAL@once,after=migration.precopy"])):
        report = migrate(source, target.listen)
    assert not report.precopy and report.iterations == 0, report
    assert any("KVM refused dirty logging" in note for note in report.notes), report.notes
    assert report.pages_sent * 4096 >= FILLED
    assert source.stopping.is_set() and memory_hash(source) == before
    from kvmkit.api.client import call

    call(str(tmp_path / "target.api"), "stop")
    assert target.wait(60) == 0


def test_a_target_failing_to_load_the_state_leaves_the_source_running(tmp_path, source):
    """A KVM ioctl fails on the target while it loads the vCPU state: it refuses, and
    the source, not yet committed, carries on."""
    before = memory_hash(source)
    target = receiver(tmp_path, "--fault", "ioctl:KVM_SET_REGS:EINVAL@once")
    with pytest.raises(MigrationError) as e:
        migrate(source, target.listen)
    assert "failed during state: the target refused" in str(e.value), e.value
    assert "KVM_SET_REGS" in str(e.value) and "running, unchanged" in str(e.value)
    assert_source_intact(source, before)
    code, err = target.wait(60), target.output
    assert code == 1 and "nothing was started here" in err, err


def test_a_target_that_cannot_start_after_the_go_lets_the_source_resume(tmp_path, source):
    """Past the go the target found it could not start (its API socket path was taken
    meanwhile): it says it will not run, so the source resumes instead of waiting."""
    import socket

    api = tmp_path / "target.api"
    before = memory_hash(source)
    target = receiver(tmp_path, "--api-socket", str(api))
    squatter = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    squatter.bind(str(api))
    squatter.listen(1)
    try:
        with pytest.raises(MigrationError) as e:
            migrate(source, target.listen)
    finally:
        squatter.close()
    assert "failed during commit" in str(e.value), e.value
    assert "could not start" in str(e.value) and "running, unchanged" in str(e.value)
    assert_source_intact(source, before)
    code, err = target.wait(60), target.output
    assert code != 0 and "another process is listening" in err, err


def test_a_bit_flipped_on_the_way_in_is_caught_by_the_target(tmp_path, source):
    """The target's own receive path damages a byte (after the handshake): its checksum
    check refuses the stream; the source, not yet committed, carries on."""
    before = memory_hash(source)
    target = receiver(tmp_path, "--fault", "migration.recv:corrupt@nth=5,after=migration.precopy")
    with pytest.raises(MigrationError) as e:
        migrate(source, target.listen)
    assert "running, unchanged" in str(e.value), e.value
    assert_source_intact(source, before)
    code, err = target.wait(60), target.output
    assert code == 1 and "checksum mismatch" in err and "nothing was started here" in err, err
