"""Snapshot a running guest at random points, restore each snapshot in a new process,
and check the guest continues exactly: 50 snapshots per test run, across both memory
backends and 1 and 2 vCPUs, through the CLI and the control socket as a user would."""

import os
import random
import subprocess
import sys
import time

import pytest

from kvmkit.api.client import call

from .snapshot_helpers import assert_counter_output

# (backend, vCPUs, snapshots): 50 in all.
CHAINS = [("guest_memfd", 1, 13), ("guest_memfd", 2, 13), ("memfd", 1, 12), ("memfd", 2, 12)]
STEPS = 1500
SEED = int(os.environ.get("KVMKIT_TEST_SEED", random.randrange(1 << 30)))


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "kvmkit", *args, "-q"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_socket(path: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 30
    while not os.path.exists(path):
        assert proc.poll() is None, f"kvmkit exited early: {proc.stderr.read()}"
        assert time.monotonic() < deadline, "the API socket never appeared"
        time.sleep(0.005)


@pytest.mark.parametrize(("backend", "vcpus", "snapshots"), CHAINS)
def test_guest_continues_across_snapshot_chain(tmp_path, backend, vcpus, snapshots):
    rng = random.Random(f"{SEED}-{backend}-{vcpus}")
    context = f"[KVMKIT_TEST_SEED={SEED}] "
    sock = str(tmp_path / "vm.sock")
    consoles = []
    taken = 0
    args = [
        "run",
        "--guest",
        "counter",
        "--guest-arg",
        str(STEPS),
        "--vcpus",
        str(vcpus),
        "--memory",
        "64M",
        "--memory-backend",
        backend,
    ]
    for hop in range(snapshots + 1):
        console = tmp_path / f"console{hop}.txt"
        consoles.append(console)
        proc = _start([*args, "--api-socket", sock, "--console", str(console)])
        if hop == snapshots:
            break
        _wait_for_socket(sock, proc)
        time.sleep(rng.uniform(0.01, 0.08))
        snap = str(tmp_path / f"hop{hop}.snap")
        try:
            call(sock, "snapshot", {"path": snap})
        finally:
            call(sock, "stop")
        assert proc.wait(30) == 0, proc.stderr.read()
        taken += 1
        args = ["snapshot", "restore", snap]
    assert proc.wait(60) == 0, context + proc.stderr.read()
    text = "".join(c.read_text() for c in consoles)
    assert_counter_output(text, vcpus, STEPS, context)
    assert taken == snapshots
