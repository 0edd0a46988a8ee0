"""Live migration between two kvmkit processes: the counter guest continues on the
target with exactly its model sequence; guest_memfd and memfd; TCP and Unix sockets;
two network namespaces joined by a veth pair; a guest dirtying memory at a set rate
converges; and a failure in each phase leaves the source running and intact."""

import signal
import subprocess
import time
import uuid

import pytest

from kvmkit.api.client import call

from .migration_helpers import Source, Target, free_port, report, send, send_in_background
from .snapshot_helpers import assert_counter_output

STEPS = 2500  # about 2 s for one vCPU: the migration starts well before the end
FAILURE_STEPS = 1200  # about 2.5 s for two: a failed migration is over long before


def combined(source: Source, target: Target) -> str:
    return source.console.read_text() + target.console.read_text()


@pytest.mark.parametrize(
    ("backend", "vcpus", "transport", "tracking"),
    [
        ("guest_memfd", 1, "tcp", "bitmap"),
        ("guest_memfd", 2, "unix", "bitmap"),
        ("memfd", 2, "tcp", "bitmap"),
        ("memfd", 1, "unix", "bitmap"),
        ("guest_memfd", 2, "tcp", "dirty ring"),
        ("memfd", 1, "unix", "dirty ring"),
    ],
)
def test_running_counter_migrates_and_continues(tmp_path, backend, vcpus, transport, tracking):
    listen = f"tcp:127.0.0.1:{free_port()}" if transport == "tcp" else f"unix:{tmp_path / 'm.sock'}"
    ring = ["--dirty-ring", "64K"] if tracking == "dirty ring" else []
    args = ["--vcpus", str(vcpus), "--memory-backend", backend, *ring]
    target = Target(tmp_path, listen)  # first: the guest runs to its end in ~2 s
    source = Source(tmp_path, "counter", STEPS, *args)
    time.sleep(0.2)
    r = report(send(source, listen))
    assert source.wait() == 0 and "migrated to" in source.output
    assert target.wait() == 0, target.output
    assert r["backend"] == backend and r["iterations"] >= 1 and r["downtime_ms"] > 0
    slots = "plain slots over the guest_memfd mapping" if backend == "guest_memfd" else "slot flag"
    assert r["dirty_tracking"] == f"{tracking}, {slots}"
    assert_counter_output(combined(source, target), vcpus, STEPS)
    assert f"on {backend}" in target.output


def test_migration_between_two_network_namespaces(tmp_path):
    """Two 'hosts': network namespaces joined by a veth pair, created and removed here."""
    tag = uuid.uuid4().hex[:6]
    a, b = f"kk-a-{tag}", f"kk-b-{tag}"
    setup = [
        ["ip", "netns", "add", a],
        ["ip", "netns", "add", b],
        ["ip", "link", "add", f"kka{tag}", "type", "veth", "peer", "name", f"kkb{tag}"],
        ["ip", "link", "set", f"kka{tag}", "netns", a],
        ["ip", "link", "set", f"kkb{tag}", "netns", b],
        ["ip", "-n", a, "addr", "add", "10.199.0.1/24", "dev", f"kka{tag}"],
        ["ip", "-n", b, "addr", "add", "10.199.0.2/24", "dev", f"kkb{tag}"],
        ["ip", "-n", a, "link", "set", f"kka{tag}", "up"],
        ["ip", "-n", b, "link", "set", f"kkb{tag}", "up"],
        ["ip", "-n", a, "link", "set", "lo", "up"],
        ["ip", "-n", b, "link", "set", "lo", "up"],
    ]
    try:
        for cmd in setup:
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode != 0:
                pytest.skip(f"cannot build the namespaces ({' '.join(cmd)}: {p.stderr.strip()})")
        in_a, in_b = ["ip", "netns", "exec", a], ["ip", "netns", "exec", b]
        target = Target(tmp_path, "tcp:10.199.0.2:4444", prefix=in_b)
        source = Source(tmp_path, "counter", STEPS, "--vcpus", "2", prefix=in_a)
        time.sleep(0.2)
        r = report(send(source, "tcp:10.199.0.2:4444", prefix=in_a))
        assert source.wait() == 0 and target.wait() == 0, target.output
        assert r["target"] == "tcp:10.199.0.2:4444"
        assert_counter_output(combined(source, target), 2, STEPS)
    finally:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def round_lines(text: str) -> list[int]:
    return [
        int(line.split()[-1]) for line in text.splitlines() if line.startswith("dirtier: round")
    ]


@pytest.mark.parametrize(("share", "auto"), [(10, False), (50, False), (90, False), (90, True)])
def test_a_guest_dirtying_memory_converges(tmp_path, share, auto):
    """The dirtier writes `share`% of a 32 MiB/s link's worth of pages per ms over a
    64 MiB working set; pre-copy converges (with auto-converge, by throttling the
    vCPUs), and the guest carries on over there from the round it had reached."""
    link = 32 << 20
    pages_per_ms = max(1, link * share // 100 // 4096 // 1000)
    listen = f"tcp:127.0.0.1:{free_port()}"
    source = Source(tmp_path, "dirtier", (64 << 32) | pages_per_ms)
    api = str(tmp_path / "target.sock")
    target = Target(tmp_path, listen, "--api-socket", api)
    source.wait_for_console("dirtier: round 1000")
    extra = ["--bandwidth", str(link), "--max-downtime-ms", "50"]
    r = report(send(source, listen, *extra, *(["--auto-converge"] if auto else [])))
    assert r["converged"], r
    assert r["final_dirty_bytes"] > 0, r
    assert (r["throttle_max"] > 0) == auto, r
    assert source.wait() == 0
    end = time.monotonic() + 30
    while not round_lines(target.console.read_text()):
        assert time.monotonic() < end, target.output
        time.sleep(0.05)
    call(api, "stop")
    assert target.wait() == 0, target.output
    rounds = round_lines(combined(source, target))
    assert rounds == list(range(1000, 1000 * (len(rounds) + 1), 1000)), rounds


# -- failures through the CLI: the source keeps running and its guest finishes exactly -----
# (tests/faults/test_migration_faults.py fails every phase on both backends, and hashes
# the source's memory)
@pytest.mark.parametrize(
    ("rule", "phase"),
    [
        ("migration.send:disconnect@once", "handshake"),
        ("migration.send:disconnect@nth=3,after=migration.precopy", "precopy"),
        ("migration.send:disconnect@once,after=migration.stop-and-copy", "stop-and-copy"),
        ("migration.send:corrupt@once,after=migration.state", "state"),
    ],
)
def test_a_failure_in_each_phase_leaves_the_source_running(tmp_path, rule, phase):
    listen = f"tcp:127.0.0.1:{free_port()}"
    target = Target(tmp_path, listen)
    source = Source(tmp_path, "counter", FAILURE_STEPS, "--vcpus", "2", "--fault", rule)
    time.sleep(0.2)
    p = send(source, listen)
    assert p.returncode == 1
    assert f"failed during {phase}" in p.stderr and "this VM is running, unchanged" in p.stderr, (
        p.stderr
    )
    assert "Traceback" not in p.stderr
    assert target.wait() != 0
    assert "nothing was started here" in target.output, target.output
    assert source.wait() == 0, source.output  # the guest finishes on the source
    assert "guest exited with status 0" in source.output
    assert_counter_output(source.console.read_text(), 2, FAILURE_STEPS)


def test_a_killed_target_leaves_the_source_running(tmp_path):
    listen = f"tcp:127.0.0.1:{free_port()}"
    source = Source(tmp_path, "dirtier", (8 << 32) | 20)
    target = Target(tmp_path, listen)
    sender = send_in_background(source, listen, "--bandwidth", "4M")
    time.sleep(1.0)  # well into pre-copy: 8 MiB at 4 MB/s
    target.kill()
    _, err = sender.communicate(timeout=60)
    assert sender.returncode == 1 and "this VM is running, unchanged" in err, err
    assert source.state() == "running"
    call_stop(source)


def test_ctrl_c_on_the_sender_cancels_and_the_source_carries_on(tmp_path):
    listen = f"tcp:127.0.0.1:{free_port()}"
    source = Source(tmp_path, "dirtier", (8 << 32) | 20, "--memory-backend", "guest_memfd")
    target = Target(tmp_path, listen)
    sender = send_in_background(source, listen, "--bandwidth", "4M")
    time.sleep(1.0)
    sender.send_signal(signal.SIGINT)
    _, err = sender.communicate(timeout=60)
    assert sender.returncode == 130 and "migration cancelled" in err, err
    assert target.wait() == 1 and "nothing was started here" in target.output
    end = time.monotonic() + 10  # the source notices at its next progress event
    while source.state() != "running" or "cancelled" not in source.output:
        assert time.monotonic() < end, source.output
        time.sleep(0.05)
    rounds = len(source.console.read_text())
    time.sleep(1.2)
    assert len(source.console.read_text()) > rounds  # the guest still runs, here
    call_stop(source)


def test_after_the_go_the_source_stays_paused_if_the_target_is_silent(tmp_path):
    """Past the commit point the target may be running: the source must not resume."""
    listen = f"tcp:127.0.0.1:{free_port()}"
    rule = "migration.recv:disconnect@once,after=migration.commit"
    source = Source(tmp_path, "counter", 0, "--fault", rule)
    target = Target(tmp_path, listen)
    time.sleep(0.2)
    p = send(source, listen)
    assert p.returncode == 1 and "stays paused" in p.stderr, p.stderr
    assert source.state() == "paused"
    target.wait_for("starting")
    target.kill()
    call_stop(source)


def call_stop(source: Source) -> None:
    from kvmkit.api.client import call

    call(source.socket, "stop")
    assert source.wait() == 0
