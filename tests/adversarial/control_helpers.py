"""A running kvmkit (its own process, a counter guest, the control API) for the
control-plane tests, and what a user would look at: its stderr, fds, threads, RSS."""

import os
import socket
import time
from pathlib import Path

import pytest

from kvmkit.api.client import call
from kvmkit.testing.harness import kvm_unavailable_reason
from tests.kvm.migration_helpers import Source


def need_kvm() -> None:
    reason = kvm_unavailable_reason()
    if reason is not None:
        pytest.skip(f"needs KVM: {reason}")


class Vm(Source):
    """`kvmkit run --guest counter` (counting until stopped) with --api-socket."""

    def __init__(self, tmp: Path, *extra: str, prefix: list[str] | None = None) -> None:
        need_kvm()
        super().__init__(tmp, "counter", 0, *extra, prefix=prefix)
        try:
            settle(lambda: call(self.socket, "status")["state"] == "running")
        except BaseException:
            self.kill()  # never left counting for the rest of the session
            raise

    def warm_up(self, tmp: Path) -> None:
        """One of each request, so that threads started on first use (the console
        writer, KVM's own) exist before a test counts threads and fds."""
        call(self.socket, "pause")
        call(self.socket, "snapshot", {"path": str(tmp / "warm-up.snap"), "resume": True})
        call(self.socket, "resume")
        (tmp / "warm-up.snap").unlink()

    @property
    def pid(self) -> int:
        return self.p.pid

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def threads(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/task"))

    def peak_rss_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        raise AssertionError("no VmHWM")

    def connect(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(self.socket)
        return s

    def stderr_has_no_traceback(self) -> None:
        text = self.output
        assert "Traceback" not in text and "Exception in thread" not in text, text[-3000:]


def read_line(sock: socket.socket, timeout_s: float = 30) -> bytes:
    """One line the server sent (b"" if it closed first)."""
    sock.settimeout(timeout_s)
    data = b""
    while not data.endswith(b"\n"):
        try:
            piece = sock.recv(4096)
        except ConnectionResetError:
            break
        if not piece:
            break
        data += piece
    return data


def settle(check, timeout_s: float = 30) -> None:  # noqa: ANN001
    """Wait until `check()` holds (threads that end after their client went away)."""
    end = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < end, "did not settle"
        time.sleep(0.05)
