"""A console reader that stopped reading (stdout a pipe nobody reads) never freezes
control: with kvmkit's console writer blocked in write(2), pause, snapshot, resume
and stop all answer, and `stop` ends the process."""

import os
import subprocess
import sys
import time

from kvmkit.api.client import call
from kvmkit.snapshot.file import inspect
from tests.adversarial.control_helpers import need_kvm, settle


def _blocked_in_pipe_write(pid: int) -> bool:
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/wchan") as f:
                if "pipe_write" in f.read():
                    return True
        except OSError:
            continue
    return False


def test_a_stalled_console_reader_does_not_freeze_control(tmp_path):
    need_kvm()
    sock = str(tmp_path / "vm.sock")
    with open(tmp_path / "vm.err", "wb") as err:
        p = subprocess.Popen(
            [sys.executable, "-m", "kvmkit", "run", "--guest", "counter", "--guest-arg", "0"]
            + ["--api-socket", sock],
            stdout=subprocess.PIPE,  # never read
            stderr=err,
        )
    try:
        settle(lambda: _blocked_in_pipe_write(p.pid), timeout_s=60)
        assert call(sock, "pause")["state"] == "paused"
        snap = tmp_path / "vm.snap"
        reply = call(sock, "snapshot", {"path": str(snap), "resume": True})
        assert reply["state"] == "paused"  # the user's pause holds
        assert inspect(snap)["checksums"].endswith("verified")
        assert call(sock, "resume")["state"] == "running"
        assert _blocked_in_pipe_write(p.pid)  # still stalled: nothing above waited on it
        assert call(sock, "stop")["state"] == "stopped"
        started = time.monotonic()
        assert p.wait(60) == 0  # stop stops, though the reader never read
        print(f"stopped {time.monotonic() - started:.2f} s after 'stop' with the console stalled")
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        assert p.stdout is not None
        p.stdout.close()
    text = (tmp_path / "vm.err").read_text()
    assert "stopped through the control API" in text and "Traceback" not in text, text
