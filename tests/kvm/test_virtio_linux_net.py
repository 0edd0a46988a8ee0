"""virtio-net and virtio-vsock under the project's Linux test kernel.

The module boots the test kernel once with a network interface on a tap (inside a
throwaway network namespace, see kvmkit/testing/netns.py) and a hybrid vsock, brings
eth0 up as GUEST_IP, and snapshots it at the init's prompt; each test restores that
snapshot in milliseconds. The peer is a process in the namespace, at HOST_IP on the
tap. Data is the init's pattern; both ends report FNV-1a checksums.
"""

import io
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from kvmkit.guests.linux.pattern import fnv1a64, pattern
from kvmkit.machine import build_for_boot
from kvmkit.machine.resources import NetSpec, VsockSpec
from kvmkit.testing.linux import (
    DONE_RE,
    READY,
    LinuxGuest,
    kernel_resources,
    restore_guest,
    snapshot_at_prompt,
)
from kvmkit.testing.netns import GUEST_IP, HOST_IP, PREFIX, NetLab

MAC = "06:00:ac:10:00:02"
CID = 3
PEER = Path(__file__).parent / "net_peer.py"


@pytest.fixture(scope="module")
def lab():
    reason = NetLab.unavailable()
    if reason is not None:
        pytest.skip(reason)
    with NetLab.create() as lab:
        yield lab


@pytest.fixture(scope="module")
def net_snapshot(test_kernel, lab, tmp_path_factory):
    """The test kernel booted with eth0 on the lab's tap and a vsock, eth0 up."""
    where = tmp_path_factory.mktemp("net")
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


@pytest.fixture
def guest(net_snapshot, lab):
    path, _ = net_snapshot
    with lab.entered():
        guest = restore_guest(path)
    try:
        yield guest
    finally:
        guest.close()


@pytest.fixture
def uds(net_snapshot):
    return net_snapshot[1]


def _peer(lab, *args) -> subprocess.Popen:
    return lab.popen(
        [sys.executable, str(PEER), *map(str, args)], stdout=subprocess.PIPE, text=True
    )


def _expect(n: int, seed: int) -> str:
    return f"{fnv1a64(pattern(seed, 0, n)):016x}"


def _start(guest: LinuxGuest, line: str) -> None:
    """Send a command without waiting for it (it blocks until its peer comes)."""
    with guest._cond:
        guest._seen = len(guest.lines)
    guest.send(line)


def _finish(guest: LinuxGuest, timeout_s: float = 120) -> tuple[str, int]:
    done = guest.wait_for(DONE_RE, timeout_s)
    lines = guest.lines[: guest.lines.index(done)]
    m = DONE_RE.match(done)
    assert m is not None
    return lines[-1] if lines else "", int(m.group(1))


def test_the_guest_sees_its_mac_and_the_link_up(guest):
    assert guest.command("cat /sys/class/net/eth0/address").lines == [MAC]
    assert guest.command("cat /sys/class/net/eth0/carrier").lines == ["1"]


def test_tcp_from_the_guest_reaches_a_peer_in_another_namespace(guest, lab):
    n, seed = 1 << 20, 7
    peer = _peer(lab, "tcp-recv", HOST_IP, 5001)
    assert peer.stdout.readline().strip() == "listening"
    result = guest.command(f"tcp-send {HOST_IP} 5001 {n} {seed}")
    out, _ = peer.communicate(timeout=60)
    assert result.rc == 0, result.text
    assert result.value("fnv") == _expect(n, seed)
    assert out.split() == [f"received={n}", f"fnv={_expect(n, seed)}"]


def test_tcp_from_the_peer_reaches_the_guest(guest, lab):
    n, seed = 1 << 20, 8
    _start(guest, "tcp-recv 5002")
    peer = _peer(lab, "tcp-send", GUEST_IP, 5002, n, seed)
    line, rc = _finish(guest)
    out, _ = peer.communicate(timeout=60)
    assert rc == 0, line
    assert line.split() == [f"received={n}", f"fnv={_expect(n, seed)}"]
    assert out.split() == [f"sent={n}", f"fnv={_expect(n, seed)}"]


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
            h, n = 0xCBF29CE484222325, 0
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


def test_vsock_guest_to_host_reaches_uds_port_and_echoes_back(guest, uds):
    n, seed = 1 << 20, 9
    server = EchoServer(f"{uds}_5003")
    try:
        result = guest.command(f"vsock-send 2 5003 {n} {seed}")
    finally:
        server.close()
    assert result.rc == 0, result.text
    assert result.value("fnv") == result.value("rfnv") == _expect(n, seed)
    assert result.value("received") == str(n)
    assert server.received == [(n, _expect(n, seed))]


def _host_connect(uds: str, port: int, timeout_s: float = 60) -> socket.socket:
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


def test_vsock_host_to_guest_with_connect_echoes_back(guest, uds):
    n, seed = 1 << 20, 10
    data = pattern(seed, 0, n)
    _start(guest, "vsock-echo 5004")
    with _host_connect(uds, 5004) as s:
        back = bytearray()

        def read() -> None:
            while chunk := s.recv(1 << 16):
                back.extend(chunk)

        reader = threading.Thread(target=read)
        reader.start()
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        reader.join(120)
    line, rc = _finish(guest)
    assert rc == 0, line
    assert line.split() == [f"echoed={n}", f"fnv={_expect(n, seed)}"]
    assert bytes(back) == data


def test_a_vsock_peer_that_vanishes_resets_the_guest_stream(guest, uds):
    path = f"{uds}_5005"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    server.settimeout(60)
    _start(guest, f"vsock-send 2 5005 {4 << 20} 11")
    conn, _ = server.accept()
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    conn.recv(4096)
    conn.close()  # unread bytes: the host end resets
    server.close()
    Path(path).unlink()
    line, rc = _finish(guest)
    assert rc != 0 and line.startswith("kvmkit-init: error send: E"), line  # EPIPE/ECONNRESET
    assert guest.command("echo still here").lines == ["still here"]


def test_a_deleted_tap_is_link_down_and_the_vmm_runs_on(net_snapshot, tmp_path):
    """On a tap of its own (the lab's is shared by the other tests)."""
    path, _ = net_snapshot
    with NetLab.create() as own:
        with own.entered():
            guest = restore_guest(path, net_taps={"eth0": own.tap})
        try:
            assert guest.command("cat /sys/class/net/eth0/carrier").lines == ["1"]
            own.ip("link", "del", own.tap)
            # The tap's fd reports the deletion at once: no traffic is needed to see it.
            for _ in range(100):
                if guest.command("cat /sys/class/net/eth0/carrier").lines == ["0"]:
                    break
                time.sleep(0.1)
            assert guest.command("cat /sys/class/net/eth0/carrier").lines == ["0"]
            assert guest.command("echo still here").lines == ["still here"]
            net = guest.machine.devices["net0"]
            assert "tap" in net.tap_error and "deleted" in net.tap_error
            assert guest.machine.alive
        finally:
            guest.close()


def test_snapshot_with_a_vsock_stream_in_flight_loses_and_repeats_nothing(
    net_snapshot, lab, tmp_path
):
    """A snapshot taken while a stream runs: the running machine's stream completes
    intact; the restored copy's stream is reset (its host end is gone), nothing of
    it reaches the host twice, and new streams work at once."""
    from kvmkit.control.snapshots import take_snapshot

    path, uds = net_snapshot
    n, seed = 2 << 20, 12
    with lab.entered():
        guest = restore_guest(path)
    try:
        go_on = threading.Event()
        server = EchoServer(f"{uds}_5007", slow_first=go_on)
        _start(guest, f"vsock-send 2 5007 {n} {seed}")
        assert server.first_bytes.wait(60)
        take_snapshot(guest.machine, tmp_path / "inflight.snap", resume=True)
        go_on.set()
        line, rc = _finish(guest)
        server.close()
    finally:
        guest.close()
    assert rc == 0, line
    assert line.split()[1::2] == [f"fnv={_expect(n, seed)}", f"rfnv={_expect(n, seed)}"]
    assert server.received == [(n, _expect(n, seed))]

    with lab.entered():
        restored = restore_guest(tmp_path / "inflight.snap")
    try:
        again = EchoServer(f"{uds}_5007")
        line, rc = _finish(restored)  # the in-flight command ends: its stream was reset
        assert rc != 0 and "ECONNRESET" in line, line
        result = restored.command(f"vsock-send 2 5007 65536 {seed + 1}")
        again.close()
    finally:
        restored.close()
    assert result.rc == 0, result.text
    assert result.value("rfnv") == _expect(65536, seed + 1)
    assert again.received == [(65536, _expect(65536, seed + 1))]  # nothing of the old stream


def test_kvmkit_run_with_net_and_vsock_flags(test_kernel, lab, tmp_path):
    """What a user types: `kvmkit run --net tap=... --vsock cid=...,uds=...`; the
    guest's one command (kvmkit.cmd) streams over vsock and the run ends with it."""
    uds = tmp_path / "cli.sock"
    server = EchoServer(f"{uds}_5010")
    cmdline = f'{test_kernel.cmdline} kvmkit.cmd="vsock-send 2 5010 65536 5"'
    argv = [
        *(sys.executable, "-m", "kvmkit", "run", "--kernel", str(test_kernel.vmlinux)),
        *("--initrd", str(test_kernel.initramfs), "--cmdline", cmdline, "--memory", "128M"),
        *("--net", f"tap={lab.tap},mac=06:00:ac:10:00:09", "--vsock", f"cid=7,uds={uds}"),
        *("--timeout", "300"),
    ]
    try:
        p = subprocess.run(lab.command(argv), capture_output=True, text=True, timeout=330)
    finally:
        server.close()
    assert p.returncode == 0, p.stderr[-2000:]
    assert f"fnv={_expect(65536, 5)} received=65536 rfnv={_expect(65536, 5)}" in p.stdout
    assert server.received == [(65536, _expect(65536, 5))]
    assert not uds.exists()  # the vsock's socket goes with the machine
