"""virtio-net and virtio-vsock under the project's Linux test kernel.

The module boots the test kernel once with a network interface on a tap (inside a
throwaway network namespace, see kvmkit/testing/netns.py) and a hybrid vsock, brings
eth0 up as GUEST_IP, and snapshots it at the init's prompt; each test restores that
snapshot in milliseconds. The peer is a process in the namespace, at HOST_IP on the
tap. Data is the init's pattern; both ends report FNV-1a checksums.
"""

import io
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from kvmkit.guests.linux.pattern import pattern
from kvmkit.testing.linux import LinuxGuest, restore_guest
from kvmkit.testing.netns import GUEST_IP, HOST_IP, NetLab
from tests.net_helpers import (
    MAC,
    EchoServer,
    boot_net_snapshot,
    expect,
    finish,
    host_connect,
    output,
    peer,
    start,
)


@pytest.fixture(scope="module")
def net_snapshot(test_kernel, lab, tmp_path_factory):
    """The test kernel booted with eth0 on the lab's tap and a vsock, eth0 up."""
    return boot_net_snapshot(test_kernel, lab, tmp_path_factory.mktemp("net"))


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


def test_the_guest_sees_its_mac_and_the_link_up(guest):
    assert output(guest.command("cat /sys/class/net/eth0/address").lines) == [MAC]
    assert output(guest.command("cat /sys/class/net/eth0/carrier").lines) == ["1"]


def test_tcp_from_the_guest_reaches_a_peer_in_another_namespace(guest, lab):
    n, seed = 1 << 20, 7
    p = peer(lab, "tcp-recv", HOST_IP, 5001)
    assert p.stdout.readline().strip() == "listening"
    result = guest.command(f"tcp-send {HOST_IP} 5001 {n} {seed}")
    out, _ = p.communicate(timeout=60)
    assert result.rc == 0, result.text
    assert result.value("fnv") == expect(n, seed)
    assert out.split() == [f"received={n}", f"fnv={expect(n, seed)}"]


def test_tcp_from_the_peer_reaches_the_guest(guest, lab):
    n, seed = 1 << 20, 8
    start(guest, "tcp-recv 5002")
    p = peer(lab, "tcp-send", GUEST_IP, 5002, n, seed)
    line, rc = finish(guest)
    out, _ = p.communicate(timeout=60)
    assert rc == 0, line
    assert line.split() == [f"received={n}", f"fnv={expect(n, seed)}"]
    assert out.split() == [f"sent={n}", f"fnv={expect(n, seed)}"]


def test_vsock_guest_to_host_reaches_uds_port_and_echoes_back(guest, uds):
    n, seed = 1 << 20, 9
    server = EchoServer(f"{uds}_5003")
    try:
        result = guest.command(f"vsock-send 2 5003 {n} {seed}")
    finally:
        server.close()
    assert result.rc == 0, result.text
    assert result.value("fnv") == result.value("rfnv") == expect(n, seed)
    assert result.value("received") == str(n)
    assert server.received == [(n, expect(n, seed))]


def test_vsock_host_to_guest_with_connect_echoes_back(guest, uds):
    n, seed = 1 << 20, 10
    data = pattern(seed, 0, n)
    start(guest, "vsock-echo 5004")
    with host_connect(uds, 5004) as s:
        back = bytearray()

        def read() -> None:
            while chunk := s.recv(1 << 16):
                back.extend(chunk)

        reader = threading.Thread(target=read)
        reader.start()
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        reader.join(120)
    line, rc = finish(guest)
    assert rc == 0, line
    assert line.split() == [f"echoed={n}", f"fnv={expect(n, seed)}"]
    assert bytes(back) == data


def test_a_vsock_peer_that_vanishes_resets_the_guest_stream(guest, uds):
    path = f"{uds}_5005"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    server.settimeout(60)
    start(guest, f"vsock-send 2 5005 {4 << 20} 11")
    conn, _ = server.accept()
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    conn.recv(4096)
    conn.close()  # unread bytes: the host end resets
    server.close()
    Path(path).unlink()
    line, rc = finish(guest)
    assert rc != 0 and line.startswith("kvmkit-init: error send: E"), line  # EPIPE/ECONNRESET
    assert output(guest.command("echo still here").lines) == ["still here"]


def test_a_deleted_tap_is_link_down_and_the_vmm_runs_on(net_snapshot, tmp_path):
    """On a tap of its own (the lab's is shared by the other tests)."""
    path, _ = net_snapshot
    with NetLab.create() as own:
        with own.entered():
            guest = restore_guest(path, net_taps={"eth0": own.tap})
        try:
            assert output(guest.command("cat /sys/class/net/eth0/carrier").lines) == ["1"]
            own.ip("link", "del", own.tap)
            # The tap's fd reports the deletion at once: no traffic is needed to see it.
            for _ in range(100):
                if output(guest.command("cat /sys/class/net/eth0/carrier").lines) == ["0"]:
                    break
                time.sleep(0.1)
            assert output(guest.command("cat /sys/class/net/eth0/carrier").lines) == ["0"]
            assert output(guest.command("echo still here").lines) == ["still here"]
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
        start(guest, f"vsock-send 2 5007 {n} {seed}")
        assert server.first_bytes.wait(60)
        take_snapshot(guest.machine, tmp_path / "inflight.snap", resume=True)
        go_on.set()
        line, rc = finish(guest)
        server.close()
    finally:
        guest.close()
    assert rc == 0, line
    assert line.split()[1::2] == [f"fnv={expect(n, seed)}", f"rfnv={expect(n, seed)}"]
    assert server.received == [(n, expect(n, seed))]

    with lab.entered():
        restored = restore_guest(tmp_path / "inflight.snap")
    try:
        again = EchoServer(f"{uds}_5007")
        line, rc = finish(restored)  # the in-flight command ends: its stream was reset
        assert rc != 0 and re.search(r"error (send|recv|poll): (ECONNRESET|ENOTCONN|EPIPE)", line)
        result = restored.command(f"vsock-send 2 5007 65536 {seed + 1}")
        again.close()
    finally:
        restored.close()
    assert result.rc == 0, result.text
    assert result.value("rfnv") == expect(65536, seed + 1)
    assert again.received == [(65536, expect(65536, seed + 1))]  # nothing of the old stream


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
    assert f"fnv={expect(65536, 5)} received=65536 rfnv={expect(65536, 5)}" in p.stdout
    assert server.received == [(65536, expect(65536, 5))]
    assert not uds.exists()  # the vsock's socket goes with the machine
    assert f"virtio-net eth0 on tap {lab.tap}:" in p.stderr  # the run summary
    assert f"virtio-vsock cid 7 at {uds}: 1 streams opened" in p.stderr


def test_kvmkit_snapshot_restore_attaches_another_tap_and_vsock_socket(net_snapshot, tmp_path):
    """`kvmkit snapshot restore --net-tap eth0=TAP --vsock-uds PATH`, as a user runs
    it: the restored guest's eth0 is on the new tap (its peer answers TCP there) and
    its vsock streams reach the new socket path."""
    path, _ = net_snapshot
    uds = tmp_path / "new.sock"
    server = EchoServer(f"{uds}_5021")
    with NetLab.create() as other:
        p = other.popen(
            [
                *(sys.executable, "-m", "kvmkit", "snapshot", "restore", str(path)),
                *("--net-tap", f"eth0={other.tap}", "--vsock-uds", str(uds), "-q"),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        sink = peer(other, "tcp-recv", HOST_IP, 5020)
        try:
            assert sink.stdout.readline().strip() == "listening"
            p.stdin.write("tcp-send 10.77.0.1 5020 65536 6\nvsock-send 2 5021 65536 6\n")
            p.stdin.write("poweroff\n")
            p.stdin.flush()
            out, _ = p.communicate(timeout=300)
            got, _ = sink.communicate(timeout=60)
        finally:
            for proc in (p, sink):
                if proc.poll() is None:
                    proc.kill()
            server.close()
    assert p.returncode == 0, out[-2000:]
    assert f"sent=65536 fnv={expect(65536, 6)}" in out
    assert got.split() == ["received=65536", f"fnv={expect(65536, 6)}"]
    assert f"rfnv={expect(65536, 6)}" in out
    assert server.received == [(65536, expect(65536, 6))]


def test_live_migration_moves_the_interface_to_another_tap_and_the_vsock_to_another_socket(
    net_snapshot, lab, tmp_path
):
    """A migration on one host: the target attaches eth0 to another tap (the source
    holds its own until the end) and the vsock to another socket path; after the move
    the guest's TCP reaches the peer behind the new tap and its vsock streams the new
    path."""
    from kvmkit.migration import IncomingMigration
    from kvmkit.migration.source import migrate

    path, _ = net_snapshot
    uds = tmp_path / "moved.sock"
    with lab.entered():
        source = restore_guest(path)
    with NetLab.create() as other:
        address = f"unix:{tmp_path / 'in.sock'}"
        incoming = IncomingMigration(address)
        received: list[LinuxGuest] = []

        def receive() -> None:
            with other.entered():
                machine = incoming.receive(
                    console_stream=io.BytesIO(),
                    net_taps={"eth0": other.tap},
                    vsock_uds=str(uds),
                )
            incoming.commit()
            incoming.close()
            incoming.confirm_when_running()
            received.append(LinuxGuest(machine))

        target = threading.Thread(target=receive, daemon=True)
        target.start()
        try:
            migrate(source.machine, address)
            target.join(60)
            assert received, "the target did not start"
        finally:
            source.close()
        moved = received[0]
        server = EchoServer(f"{uds}_5030")
        try:
            sink = peer(other, "tcp-recv", HOST_IP, 5031)
            assert sink.stdout.readline().strip() == "listening"
            sent = moved.command(f"tcp-send {HOST_IP} 5031 65536 31")
            got, _ = sink.communicate(timeout=60)
            streamed = moved.command("vsock-send 2 5030 65536 32")
            assert moved.machine.devices["net0"].config.tap == other.tap
        finally:
            moved.close()
            server.close()
    assert sent.rc == 0 and got.split() == ["received=65536", f"fnv={expect(65536, 31)}"]
    assert streamed.rc == 0, streamed.text
    assert server.received == [(65536, expect(65536, 32))]


def test_overrides_must_name_what_the_snapshot_has(net_snapshot, linux_snapshot, tmp_path):
    from kvmkit.errors import ConfigError

    path, _ = net_snapshot
    with pytest.raises(ConfigError, match=r"'eht0': the saved machine has no such interface \(its"):
        restore_guest(path, net_taps={"eht0": "tap9"})
    with pytest.raises(ConfigError, match="the saved machine has no vsock device"):
        restore_guest(linux_snapshot.path, vsock_uds=str(tmp_path / "v.sock"))
