"""Shared by the virtio-net/vsock Linux tests and their fault tests: the booted
snapshot with eth0 on a lab tap and a vsock, peers, an echo server, guest commands
that block until their peer comes."""

import io
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from kvmkit.guests.linux.pattern import FNV64_OFFSET, fnv1a64, pattern
from kvmkit.machine import build_for_boot
from kvmkit.machine.resources import NetSpec, VsockSpec
from kvmkit.testing.linux import DONE_RE, READY, LinuxGuest, kernel_resources, snapshot_at_prompt
from kvmkit.testing.netns import GUEST_IP, PREFIX, NetLab

MAC = "06:00:ac:10:00:02"
CID = 3
PEER = Path(__file__).parent / "kvm" / "net_peer.py"


KERNEL_LOG = re.compile(r"^\[\s*\d+\.\d+\] ")


def output(lines: list[str]) -> list[str]:
    """A command's output without kernel messages printed in between (an RCU stall
    report after a restore on a loaded host, say)."""
    return [line for line in lines if not KERNEL_LOG.match(line)]


def boot_net_snapshot(test_kernel, lab: NetLab, where: Path) -> tuple[Path, str]:
    """Boot the test kernel with eth0 on `lab`'s tap (MAC) and a vsock (CID, socket
    `where`/v.sock), bring eth0 up as GUEST_IP and snapshot it at the prompt."""
    uds = str(where / "v.sock")
    resources = (
        kernel_resources(test_kernel)
        .with_net(NetSpec("eth0", lab.tap, MAC))
        .with_vsock(VsockSpec(CID, uds))
    )
    with lab.entered():
        machine = build_for_boot(resources, console=io.BytesIO())
    guest = LinuxGuest(machine)
    try:
        guest.wait_for(READY, 180)
        assert guest.command(f"net-up eth0 {GUEST_IP}/{PREFIX}").rc == 0
    except BaseException:
        guest.close()
        raise
    return snapshot_at_prompt(guest, where / "net.snap"), uds


def peer(lab, *args) -> subprocess.Popen:
    return lab.popen(
        [sys.executable, str(PEER), *map(str, args)], stdout=subprocess.PIPE, text=True
    )


def expect(n: int, seed: int) -> str:
    return f"{fnv1a64(pattern(seed, 0, n)):016x}"


def start(guest: LinuxGuest, line: str) -> None:
    """Send a command without waiting for it (it blocks until its peer comes)."""
    with guest._cond:
        guest._seen = len(guest.lines)
    guest.send(line)


def finish(guest: LinuxGuest, timeout_s: float = 120) -> tuple[str, int]:
    done = guest.wait_for(DONE_RE, timeout_s)
    with guest._cond:
        lines = output(guest.lines[: guest._seen - 1])  # wait_for consumed up to the done line
    m = DONE_RE.match(done)
    assert m is not None
    return lines[-1] if lines else "", int(m.group(1))


class EchoServer:
    """A host unix socket server at `path` that echoes each connection and records
    what it received (count and FNV-1a)."""

    def __init__(self, path: str, *, slow_first: threading.Event | None = None) -> None:
        self.path = Path(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(4)
        self.sock.settimeout(120)
        self.received: list[tuple[int, str]] = []
        self.first_bytes = threading.Event()
        self.go_on = slow_first
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        with conn:
            h, n = FNV64_OFFSET, 0
            try:
                while data := conn.recv(1 << 16):
                    h = fnv1a64(data, h)
                    n += len(data)
                    self.first_bytes.set()
                    if self.go_on is not None:
                        self.go_on.wait(60)
                    conn.sendall(data)
            except OSError:
                pass
            self.received.append((n, f"{h:016x}"))

    def close(self) -> None:
        self.sock.close()
        self.path.unlink(missing_ok=True)
        self.thread.join(10)


def host_connect(uds: str, port: int, timeout_s: float = 60) -> socket.socket:
    """CONNECT to the guest's port, retrying while the guest is not listening yet."""
    deadline = time.monotonic() + timeout_s
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(60)
        s.connect(uds)
        s.sendall(f"CONNECT {port}\n".encode())
        line = b""
        while not line.endswith(b"\n"):
            b = s.recv(1)
            if not b:
                break
            line += b
        if line.startswith(b"OK "):
            return s
        s.close()
        assert time.monotonic() < deadline, "the guest never accepted"
        time.sleep(0.2)
