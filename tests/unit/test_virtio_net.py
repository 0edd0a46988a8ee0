"""virtio-net through its registers, guest RAM as a bytearray, on a real tap in a
throwaway network namespace: what the host sends arrives in receive buffers (merged
across several with MRG_RXBUF), what the driver sends leaves through the tap, a
frame with no buffer to go into waits, a deleted tap is link down."""

import select
import socket
import struct

import pytest

from kvmkit.devices.irq import LevelRecorder
from kvmkit.devices.tap import VNET_HDR_BYTES, Tap
from kvmkit.devices.virtio import mmio
from kvmkit.devices.virtio.net import (
    RX,
    TX,
    VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_STATUS,
    NetConfig,
    VirtioNet,
)
from kvmkit.devices.virtio.queue import VIRTQ_DESC_F_WRITE
from kvmkit.errors import KvmkitError
from kvmkit.testing.netns import NetLab

pytestmark = pytest.mark.skipif(NetLab.unavailable() is not None, reason=str(NetLab.unavailable()))

RAM = 4 << 20
QSIZE = 16
RINGS = {RX: (0x1000, 0x2000, 0x3000), TX: (0x4000, 0x5000, 0x6000)}
RX_BUFS, TX_BUF = 0x100000, 0x200000
MAC = "06:00:ac:10:00:02"
ETH_TYPE = 0x88B5  # local experimental


class Ram:
    def __init__(self) -> None:
        self.data = bytearray(RAM)

    def view(self, gpa: int, length: int) -> memoryview:
        if gpa < 0 or gpa + length > RAM:
            raise KvmkitError("not guest RAM")
        return memoryview(self.data)[gpa : gpa + length]


class Reactor:
    """The event loop's reader registry, driven by the test."""

    def __init__(self) -> None:
        self.readers: dict[int, object] = {}

    def add_reader(self, fd, callback, owner) -> None:
        self.readers[fd] = callback

    def remove_reader(self, fd) -> None:
        self.readers.pop(fd, None)


class Driver:
    """Two queues of 16; receive buffers of `rx_size` bytes, posted on request."""

    def __init__(self, dev: VirtioNet, ram: Ram, features: int) -> None:
        self.dev, self.ram = dev, ram
        self.avail = {RX: 0, TX: 0}
        self.used_seen = {RX: 0, TX: 0}
        w = dev.write
        w(mmio.STATUS, 4, mmio.ACKNOWLEDGE | mmio.DRIVER)
        features |= 1 << mmio.VIRTIO_F_VERSION_1
        for sel in (0, 1):
            w(mmio.DRIVER_FEATURES_SEL, 4, sel)
            w(mmio.DRIVER_FEATURES, 4, features >> (32 * sel) & 0xFFFFFFFF)
        w(mmio.STATUS, 4, 0xB)
        for q, (desc, avail, used) in RINGS.items():
            w(mmio.QUEUE_SEL, 4, q)
            w(mmio.QUEUE_NUM, 4, QSIZE)
            w(mmio.QUEUE_DESC_LOW, 4, desc)
            w(mmio.QUEUE_DRIVER_LOW, 4, avail)
            w(mmio.QUEUE_DEVICE_LOW, 4, used)
            w(mmio.QUEUE_READY, 4, 1)
        w(mmio.STATUS, 4, 0xF)

    def post(self, q: int, index: int, addr: int, size: int, writable: bool) -> None:
        desc, avail, _ = RINGS[q]
        flags = VIRTQ_DESC_F_WRITE if writable else 0
        struct.pack_into("<QIHH", self.ram.data, desc + 16 * index, addr, size, flags, 0)
        slot = self.avail[q] % QSIZE
        struct.pack_into("<H", self.ram.data, avail + 4 + 2 * slot, index)
        self.avail[q] += 1
        struct.pack_into("<H", self.ram.data, avail + 2, self.avail[q] & 0xFFFF)

    def post_rx(self, count: int, size: int) -> None:
        for i in range(count):
            self.post(RX, i, RX_BUFS + i * 0x1000, size, True)

    def used(self, q: int) -> list[tuple[int, int]]:
        _, _, used = RINGS[q]
        idx = struct.unpack_from("<H", self.ram.data, used + 2)[0]
        out = []
        while self.used_seen[q] != idx:
            slot = self.used_seen[q] % QSIZE
            out.append(struct.unpack_from("<II", self.ram.data, used + 4 + 8 * slot))
            self.used_seen[q] += 1
        return out


@pytest.fixture
def rig():
    with NetLab.create() as lab:
        with lab.entered():
            tap = Tap.open(lab.tap)
            sniff = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_TYPE))
            sniff.bind((lab.tap, 0))
            sniff.settimeout(5)
        ram, reactor = Ram(), Reactor()
        dev = VirtioNet(
            "net0", ram, LevelRecorder(10), NetConfig("eth0", lab.tap, MAC), tap, reactor
        )
        try:
            yield dev, ram, reactor, sniff, lab
        finally:
            sniff.close()
            dev.release()


def _frame(payload: bytes) -> bytes:
    return (
        bytes.fromhex("0600ac100002")
        + bytes.fromhex("0a0000000001")
        + struct.pack(">H", ETH_TYPE)
        + payload
    )


def _deliver(dev: VirtioNet, reactor: Reactor) -> None:
    """Run the tap's reader until it has taken the frame the host sent (delivered,
    dropped or held); the host may queue it a while under load."""
    before = dev.rx_frames + dev.rx_dropped
    for _ in range(300):
        if dev.tap is None or dev.tap.fd not in reactor.readers:
            return
        if select.select([dev.tap.fd], [], [], 0.1)[0]:
            reactor.readers[dev.tap.fd]()
        if dev.rx_frames + dev.rx_dropped != before or dev.waiting is not None:
            return


def test_the_mac_and_link_status_are_in_the_configuration_space(rig):
    dev, *_ = rig
    config = bytes(dev.read(mmio.CONFIG + i, 1) for i in range(8))
    assert config[:6] == bytes.fromhex("0600ac100002")
    assert config[6] == 1  # VIRTIO_NET_S_LINK_UP


def test_a_frame_from_the_host_spans_merged_buffers(rig):
    dev, ram, reactor, sniff, _ = rig
    drv = Driver(dev, ram, 1 << VIRTIO_NET_F_MRG_RXBUF | 1 << VIRTIO_NET_F_MAC)
    drv.post_rx(8, 512)
    payload = bytes(range(256)) * 5 + b"end"
    sniff.send(_frame(payload))
    _deliver(dev, reactor)
    used = drv.used(RX)
    frame = _frame(payload)
    assert len(used) == -(-(VNET_HDR_BYTES + len(frame)) // 512)  # 3 buffers
    data = b"".join(
        bytes(ram.data[RX_BUFS + i * 0x1000 : RX_BUFS + i * 0x1000 + n]) for i, n in used
    )
    assert struct.unpack_from("<H", data, 10)[0] == len(used)  # num_buffers
    assert data[VNET_HDR_BYTES:] == frame
    assert dev.rx_frames == 1 and dev.interrupt_status & mmio.INT_USED_BUFFER


def test_a_frame_with_no_buffer_waits_and_the_tap_is_not_read_meanwhile(rig):
    dev, ram, reactor, sniff, _ = rig
    drv = Driver(dev, ram, 1 << VIRTIO_NET_F_MRG_RXBUF)
    sniff.send(_frame(b"waits for a buffer".ljust(60, b".")))
    _deliver(dev, reactor)
    assert dev.waiting is not None and dev.tap.fd not in reactor.readers
    drv.post_rx(2, 2048)
    dev.notify(RX)
    ((_, n),) = drv.used(RX)
    assert (
        ram.data[RX_BUFS + VNET_HDR_BYTES + 14 : RX_BUFS + VNET_HDR_BYTES + 32]
        == b"waits for a buffer"
    )
    assert dev.waiting is None and dev.tap.fd in reactor.readers


def test_without_merged_buffers_a_frame_too_big_for_one_is_dropped_and_the_buffer_kept(rig):
    dev, ram, reactor, sniff, _ = rig
    drv = Driver(dev, ram, 0)
    drv.post_rx(1, 256)
    sniff.send(_frame(bytes(1000)))
    _deliver(dev, reactor)
    assert drv.used(RX) == [] and dev.rx_dropped == 1
    assert dev.queues[RX].last_avail == 0  # the driver still owns its buffer


def test_a_frame_from_the_driver_leaves_through_the_tap(rig):
    dev, ram, _, sniff, _ = rig
    drv = Driver(dev, ram, 0)
    frame = bytes.fromhex("ffffffffffff0600ac100002") + struct.pack(">H", ETH_TYPE) + b"x" * 50
    ram.data[TX_BUF : TX_BUF + VNET_HDR_BYTES + len(frame)] = bytes(VNET_HDR_BYTES) + frame
    drv.post(TX, 0, TX_BUF, VNET_HDR_BYTES + len(frame), False)
    dev.notify(TX)
    assert sniff.recv(2048) == frame
    assert drv.used(TX) == [(0, 0)] and dev.tx_frames == 1


def test_a_deleted_tap_is_link_down_with_a_configuration_interrupt(rig):
    dev, ram, reactor, _, lab = rig
    Driver(dev, ram, 1 << VIRTIO_NET_F_STATUS)
    lab.ip("link", "del", lab.tap)
    for _ in range(300):
        if dev.tap is None:
            break
        select.select([dev.tap.fd], [], [], 0.1)
        reactor.readers[dev.tap.fd]()  # a read finds the tap gone
    assert dev.read(mmio.CONFIG + 6, 2) == 0  # link down
    assert dev.interrupt_status & mmio.INT_CONFIG_CHANGE
    assert "the interface was deleted" in dev.tap_error
    assert "link is down" in dev.health()
