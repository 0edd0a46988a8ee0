"""One operation at a time, as a user sees it: while a migration is in progress a
second migration, a snapshot, a pause and a resume are refused naming it (and the
migration that does run leaves the target's memory exactly right: the counter guest
checks its own memory every step); `snapshot create` never silently replaces a file;
a client that goes away (Ctrl-C) cancels its snapshot, and `stop` cancels one and
stops."""

import hashlib
import json
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from kvmkit.api.client import ApiCallError, call
from kvmkit.faults import active_plan, load_plan
from kvmkit.machine.pause import PauseTimeout

from .migration_helpers import KVMKIT, Source, Target, free_port, send, send_in_background
from .snapshot_helpers import Running, assert_counter_output, counter_config

STEPS = 4000  # several seconds for one vCPU: every refusal is asked well before the end
MIB = 1 << 20
BUSY = "a migration of this machine is in progress"


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*KVMKIT, *args], capture_output=True, text=True, timeout=120)


class StalledTarget:
    """A TCP listener that takes a migration's connection and never answers."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"tcp:127.0.0.1:{self.listener.getsockname()[1]}"
        self.conn: socket.socket | None = None
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        self.conn, _ = self.listener.accept()
        while self.conn.recv(1 << 16):
            pass

    def hang_up(self) -> None:
        if self.conn is not None:
            self.conn.shutdown(socket.SHUT_RDWR)
        self.thread.join(30)
        self.listener.close()


def in_progress(source: Source) -> list[str]:
    return call(source.socket, "status")["in_progress"]


def wait_until(check, what: str, timeout_s: float = 30) -> None:  # noqa: ANN001
    end = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < end, f"{what} did not happen"
        time.sleep(0.02)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_one_migration_at_a_time_and_the_target_memory_is_never_stale(tmp_path):
    source = Source(tmp_path, "counter", STEPS)
    stalled = StalledTarget()
    first = send_in_background(source, stalled.address)
    try:
        wait_until(lambda: in_progress(source) == ["migration"], "the first migration")
        target = Target(tmp_path, f"tcp:127.0.0.1:{free_port()}")
        second = send(source, target.listen)
        assert second.returncode == 1
        assert BUSY in json.loads(second.stdout)["error"], second.stdout
        snap = cli("snapshot", "create", "--socket", source.socket, "--out", str(tmp_path / "s"))
        assert snap.returncode == 1 and BUSY in snap.stderr, snap.stderr
        assert not (tmp_path / "s").exists()
        for request in ("pause", "resume"):
            p = cli("ctl", request, "--socket", source.socket)
            assert p.returncode == 1 and BUSY in p.stderr, p.stderr
        assert call(source.socket, "status")["state"] == "running"  # status is answered

        stalled.hang_up()  # the first migration fails and rolls back
        _, err = first.communicate(timeout=60)
        assert first.returncode == 1 and "this VM is running, unchanged" in err, err
        assert in_progress(source) == []

        done = send(source, target.listen)  # now the one migration runs, alone
        assert done.returncode == 0, done.stderr
        assert source.wait() == 0 and target.wait() == 0, target.output
        # Every step, the counter re-reads its counters from memory and prints their
        # checksum: a page the target got stale would change every line after it.
        text = source.console.read_text() + target.console.read_text()
        assert_counter_output(text, 1, STEPS)
    finally:
        first.kill()
        source.kill()


def test_snapshot_create_replaces_a_file_only_with_force_and_only_a_snapshot(tmp_path):
    source = Source(tmp_path, "counter", 0)
    try:
        out = tmp_path / "vm.snap"
        create = ["snapshot", "create", "--socket", source.socket, "--resume", "--out", str(out)]
        assert cli(*create).returncode == 0
        before = sha(out)
        p = cli(*create)
        assert p.returncode == 2 and "exists (a kvmkit snapshot): pass --force" in p.stderr
        assert sha(out) == before
        assert cli(*create, "--force").returncode == 0
        assert sha(out) != before  # a new snapshot of the machine, a moment later

        disk = tmp_path / "disk.img"
        disk.write_bytes(b"precious data, not a snapshot\n")
        create[-1] = str(disk)
        p = cli(*create, "--force")
        assert (
            p.returncode == 2 and "is not a kvmkit snapshot: kvmkit never replaces it" in p.stderr
        )
        assert disk.read_bytes() == b"precious data, not a snapshot\n"
        # the API refuses the same, whoever asks
        with pytest.raises(ApiCallError, match="pass --force"):
            call(source.socket, "snapshot", {"path": str(out), "resume": True})
    finally:
        source.kill()


def _dirtier_vm(tmp_path: Path) -> Source:
    """A guest with 256 MiB written: a snapshot of it takes long enough to cancel."""
    source = Source(tmp_path, "dirtier", (256 << 32) | 2000, "--memory", "512M")
    wait_until(
        lambda: call(source.socket, "status")["populated_bytes"] >= 256 * MIB, "256 MiB written"
    )
    return source


def _start_snapshot(source: Source, path: Path) -> socket.socket:
    """Ask for a snapshot on a raw connection and wait for its first progress event."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(source.socket)
    s.sendall(json.dumps({"cmd": "snapshot", "path": str(path), "force": True}).encode() + b"\n")
    line = s.makefile("rb").readline()
    event = json.loads(line)["event"]
    assert event["done"] < event["total"], event
    return s


def test_a_client_that_goes_away_cancels_its_snapshot(tmp_path):
    """What Ctrl-C on 'kvmkit snapshot create' does: the connection closes mid-write."""
    source = _dirtier_vm(tmp_path)
    try:
        out = tmp_path / "vm.snap"
        create = ["snapshot", "create", "--socket", source.socket, "--resume", "--out", str(out)]
        assert cli(*create).returncode == 0
        before = sha(out)
        s = _start_snapshot(source, out)
        s.close()  # Ctrl-C
        wait_until(lambda: "cancelled" in source.output, "the cancel")
        assert in_progress(source) == [] and call(source.socket, "status")["state"] == "running"
        assert sha(out) == before  # the old file stays
        assert sorted(p.name for p in tmp_path.iterdir() if "snap" in p.name) == ["vm.snap"]
        call(source.socket, "stop")
        assert source.wait() == 0
    finally:
        source.kill()


def test_stop_during_a_snapshot_cancels_it_and_stops(tmp_path):
    source = _dirtier_vm(tmp_path)
    try:
        out = tmp_path / "vm.snap"
        s = _start_snapshot(source, out)
        assert call(source.socket, "stop")["state"] == "stopped"
        reply = json.loads(s.makefile("rb").readlines()[-1])
        assert not reply["ok"] and "stopped during the snapshot" in reply["error"], reply
        assert source.wait() == 0
        assert not out.exists()
        assert [p.name for p in tmp_path.iterdir() if "snap" in p.name] == []
    finally:
        source.kill()


def test_ctrl_c_on_snapshot_create_cancels_it(tmp_path):
    source = _dirtier_vm(tmp_path)
    try:
        out = tmp_path / "vm.snap"
        create = ["snapshot", "create", "--socket", source.socket, "--resume", "--out", str(out)]
        assert cli(*create).returncode == 0
        before = sha(out)
        p = subprocess.Popen([*KVMKIT, *create, "--force"], stderr=subprocess.PIPE, text=True)
        wait_until(lambda: in_progress(source) == ["snapshot"], "the snapshot")
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
        assert p.returncode == 130 and "interrupted" in err, err
        wait_until(lambda: "cancelled" in source.output, "the cancel")
        assert in_progress(source) == [] and call(source.socket, "status")["state"] == "running"
        assert sha(out) == before  # the old file stays
        assert sorted(p.name for p in tmp_path.iterdir() if "snap" in p.name) == ["vm.snap"]
    finally:
        source.kill()


def test_a_pause_that_timed_out_never_takes_effect_later(tmp_path):
    """A vCPU held 3 s in a device handler (a planned delay) misses a 0.5 s pause: the
    pause fails, leaves no hold, and the machine is not paused when the vCPU gets
    back; a later pause works as usual."""
    console = tmp_path / "a.txt"
    with active_plan(load_plan(["device.io:delay=3s@once"])) as plan:
        run = Running(counter_config(console, 0))
        try:
            wait_until(lambda: plan.log, "the delay")  # the vCPU is in it now
            with pytest.raises(PauseTimeout, match="the pause was withdrawn"):
                run.machine.pause(timeout_s=0.5)
            assert run.machine.gate.holders == []
            wait_until(lambda: console.read_text().count("\n") > 100, "the guest going on")
            assert run.machine.status()["state"] == "running"
            run.machine.pause()
            assert run.machine.status()["paused_by"] == ["user"]
        finally:
            run.kill()


def test_stop_during_a_migration_cancels_it_and_stops(tmp_path):
    listen = f"tcp:127.0.0.1:{free_port()}"
    source = Source(tmp_path, "dirtier", (8 << 32) | 20, "--memory-backend", "guest_memfd")
    target = Target(tmp_path, listen)
    sender = send_in_background(source, listen, "--bandwidth", "4M")
    try:
        wait_until(lambda: in_progress(source) == ["migration"], "the migration")
        assert call(source.socket, "stop")["state"] == "stopped"
        _, err = sender.communicate(timeout=60)
        assert sender.returncode == 1 and "this VM is stopped" in err, err
        assert source.wait() == 0 and "stopped through the control API" in source.output
        assert target.wait() == 1 and "nothing was started here" in target.output
    finally:
        sender.kill()
        source.kill()
        target.kill()
