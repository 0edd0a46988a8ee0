"""Faults in virtio-net's tap and a vsock stream's host socket (sites tap.read,
tap.write, vsock.host): the Linux guest sees dropped frames, link down or a reset
stream; the VMM runs on. One boot for the module (tests/net_helpers.py), restored per
test, in a throwaway network namespace."""

import subprocess
import sys
import time

import pytest

from kvmkit.faults import FaultPlan, active_plan, parse_rule
from kvmkit.testing.linux import restore_guest
from kvmkit.testing.netns import GUEST_IP, HOST_IP
from tests.net_helpers import EchoServer, boot_net_snapshot, expect, output, peer


@pytest.fixture(scope="module")
def net_snapshot(test_kernel, lab, tmp_path_factory):
    return boot_net_snapshot(test_kernel, lab, tmp_path_factory.mktemp("netfaults"))


@pytest.fixture
def guest(net_snapshot, lab):
    with lab.entered():
        guest = restore_guest(net_snapshot[0])
    try:
        yield guest
    finally:
        guest.close()


def _plan(*rules: str) -> FaultPlan:
    return FaultPlan([parse_rule(r) for r in rules])


def test_frames_the_tap_refuses_are_dropped_and_tcp_recovers(guest, lab):
    net = guest.machine.devices["net0"]
    n, seed = 256 << 10, 21
    p = peer(lab, "tcp-recv", HOST_IP, 5101)
    assert p.stdout.readline().strip() == "listening"
    with active_plan(_plan("tap.write:EIO@every=7")) as plan:
        result = guest.command(f"tcp-send {HOST_IP} 5101 {n} {seed}")
    out, _ = p.communicate(timeout=60)
    assert plan.injected and net.tx_dropped >= len(plan.injected)
    assert result.rc == 0, result.text
    assert out.split() == [f"received={n}", f"fnv={expect(n, seed)}"]  # retransmitted
    assert output(guest.command("cat /sys/class/net/eth0/carrier").lines) == ["1"]


def test_a_tap_read_that_finds_the_tap_deleted_is_link_down(guest, lab):
    net = guest.machine.devices["net0"]
    with active_plan(_plan("tap.read:EBADFD@once")) as plan:
        # Any frame towards the guest makes the tap readable: an ARP request.
        send = f"import socket; socket.socket(2, 2).sendto(b'x', ('{GUEST_IP}', 9))"
        subprocess.run(lab.command([sys.executable, "-c", send]), check=True, timeout=30)
        for _ in range(100):
            if plan.injected:
                break
            time.sleep(0.05)
    assert plan.injected
    assert "the interface was deleted" in net.tap_error
    assert output(guest.command("cat /sys/class/net/eth0/carrier").lines) == ["0"]
    assert guest.machine.alive


def test_a_vsock_host_peer_that_drops_resets_the_stream_and_the_next_one_works(guest, net_snapshot):
    uds = net_snapshot[1]
    server = EchoServer(f"{uds}_5102")
    try:
        with active_plan(_plan("vsock.host:disconnect@once")) as plan:
            failed = guest.command("vsock-send 2 5102 65536 22")  # ECONNRESET or EPIPE
        assert plan.injected
        # An RST on a vsock stream is an error for a sender (EPIPE) and an early end for
        # a reader (Linux): either way the guest does not get its echo back.
        ended_early = failed.rc != 0 or failed.value("received") != "65536"
        assert ended_early, failed.text
        vsock = guest.machine.devices["vsock"]
        assert vsock.host.resets >= 1
        again = EchoServer(f"{uds}_5103")
        ok = guest.command("vsock-send 2 5103 65536 23")
        again.close()
    finally:
        server.close()
    assert ok.rc == 0, ok.text
    assert ok.value("rfnv") == expect(65536, 23)
    assert again.received == [(65536, expect(65536, 23))]
