"""The host tap a virtio-net device sits on: attached in a throwaway network namespace."""

import select
import socket
import struct

import pytest

from kvmkit.devices.tap import VNET_HDR_BYTES, Tap, TapError
from kvmkit.errors import ConfigError
from kvmkit.testing.netns import HOST_IP, NetLab

pytestmark = pytest.mark.skipif(NetLab.unavailable() is not None, reason=str(NetLab.unavailable()))


@pytest.fixture
def lab():
    with NetLab.create() as lab:
        yield lab


def _wait_arp(tap: Tap) -> bytes:
    """The next ARP frame (the host may send IPv6 neighbour discovery as well)."""
    for _ in range(100):
        select.select([tap.fd], [], [], 0.2)
        frame = tap.read_frame()
        if frame is not None and frame[VNET_HDR_BYTES + 12 : VNET_HDR_BYTES + 14] == b"\x08\x06":
            return frame
    raise AssertionError("no ARP frame came out of the tap")


def test_a_missing_tap_is_refused_with_the_command_that_makes_one():
    with pytest.raises(ConfigError) as e:
        Tap.open("kvk-nonesuch0")
    assert "no such network interface" in str(e.value)
    assert "ip tuntap add kvk-nonesuch0 mode tap" in str(e.value)


def test_frames_the_host_sends_arrive_with_a_vnet_header(lab):
    with lab.entered():
        tap = Tap.open(lab.tap)
        try:
            # The host resolves a neighbour on the tap's subnet: an ARP request comes out.
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.sendto(b"x", ("10.77.0.9", 9))
            frame = _wait_arp(tap)
        finally:
            tap.close()
    header, ether = frame[:VNET_HDR_BYTES], frame[VNET_HDR_BYTES:]
    assert header[0] == 0 and header[1] == 0  # no checksum to finish, no GSO
    assert struct.unpack(">H", ether[12:14])[0] == 0x0806  # ARP
    assert ether[:6] == b"\xff" * 6  # broadcast
    assert socket.inet_aton(HOST_IP) in ether  # the sender's address


def test_frames_written_reach_the_host(lab):
    with lab.entered():
        tap = Tap.open(lab.tap)
        sniff = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x88B5))
        try:
            sniff.bind((lab.tap, 0))
            sniff.settimeout(5)
            payload = b"kvmkit test frame".ljust(46, b".")
            ether = b"\xff" * 6 + bytes.fromhex("060000000001") + b"\x88\xb5" + payload
            assert tap.write_frame([bytes(VNET_HDR_BYTES), ether])
            got = sniff.recv(2048)
        finally:
            sniff.close()
            tap.close()
    assert got[14:] == payload


def test_a_tap_in_use_is_refused(lab):
    with lab.entered():
        first = Tap.open(lab.tap)
        try:
            with pytest.raises(ConfigError, match="already in use by another process"):
                Tap.open(lab.tap)
        finally:
            first.close()


def test_a_tun_or_another_interface_is_not_a_tap(lab):
    lab.ip("tuntap", "add", "kvktun0", "mode", "tun")
    with lab.entered():
        with pytest.raises(ConfigError, match="is not a single-queue tap device"):
            Tap.open("kvktun0")
        with pytest.raises(ConfigError, match="is not a single-queue tap device"):
            Tap.open("lo")


def test_a_deleted_tap_fails_reads_and_writes_with_one_line(lab):
    with lab.entered():
        tap = Tap.open(lab.tap)
    try:
        lab.ip("link", "del", lab.tap)
        with pytest.raises(TapError, match=f"tap {lab.tap}: read failed: the interface was del"):
            tap.read_frame()
        with pytest.raises(TapError, match="write failed: the interface was deleted"):
            tap.write_frame([bytes(VNET_HDR_BYTES + 60)])
    finally:
        tap.close()


def test_offloads_are_set_as_negotiated(lab):
    from kvmkit.devices.tap import TUN_F_CSUM, TUN_F_TSO4

    with lab.entered():
        tap = Tap.open(lab.tap)
    try:
        tap.set_offload(TUN_F_CSUM | TUN_F_TSO4)
        assert tap.offload == TUN_F_CSUM | TUN_F_TSO4
    finally:
        tap.close()
