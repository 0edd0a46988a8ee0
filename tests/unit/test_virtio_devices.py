"""virtio-blk requests and the transport's negotiation, driven through the device's
registers with guest RAM as a bytearray and a real backing file (no KVM needed: the
device code is the same that serves guests; tests/kvm drives it from real guests)."""

import os
import struct

import pytest

from kvmkit.devices.irq import LevelRecorder
from kvmkit.devices.virtio import mmio
from kvmkit.devices.virtio.blk import (
    VIRTIO_BLK_F_RO,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
    BlkConfig,
    VirtioBlk,
)
from kvmkit.devices.virtio.queue import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from kvmkit.errors import ConfigError, KvmkitError

RAM = 4 << 20
DESC, AVAIL, USED = 0x1000, 0x2000, 0x3000
HDR, DATA, STATUS = 0x10000, 0x20000, 0x30000


class Ram:
    def __init__(self) -> None:
        self.data = bytearray(RAM)

    def view(self, gpa: int, length: int) -> memoryview:
        if gpa < 0 or gpa + length > RAM:
            raise KvmkitError("not guest RAM")
        return memoryview(self.data)[gpa : gpa + length]


class Driver:
    """Just enough of a virtio driver: negotiate, one queue of 8, requests one by one."""

    def __init__(self, dev: mmio.VirtioMmioDevice, ram: Ram, features: int = 0) -> None:
        self.dev, self.ram, self.avail = dev, ram, 0
        w = dev.write
        w(mmio.STATUS, 4, 0)
        w(mmio.STATUS, 4, mmio.ACKNOWLEDGE | mmio.DRIVER)
        features |= 1 << mmio.VIRTIO_F_VERSION_1
        for sel in (0, 1):
            w(mmio.DRIVER_FEATURES_SEL, 4, sel)
            w(mmio.DRIVER_FEATURES, 4, features >> (32 * sel) & 0xFFFFFFFF)
        w(mmio.STATUS, 4, 0xB)
        assert dev.read(mmio.STATUS, 4) & mmio.FEATURES_OK
        w(mmio.QUEUE_SEL, 4, 0)
        w(mmio.QUEUE_NUM, 4, 8)
        for reg, addr in ((mmio.QUEUE_DESC_LOW, DESC), (mmio.QUEUE_DRIVER_LOW, AVAIL)):
            w(reg, 4, addr)
        w(mmio.QUEUE_DEVICE_LOW, 4, USED)
        w(mmio.QUEUE_READY, 4, 1)
        w(mmio.STATUS, 4, 0xF)

    def request(
        self, kind: int, sector: int, out: bytes = b"", in_len: int = 0
    ) -> tuple[int, bytes]:
        ram = self.ram.data
        struct.pack_into("<IIQ", ram, HDR, kind, 0, sector)
        descs = [(HDR, 16, 0)]
        if out:
            ram[DATA : DATA + len(out)] = out
            descs.append((DATA, len(out), 0))
        if in_len:
            descs.append((DATA, in_len, VIRTQ_DESC_F_WRITE))
        descs.append((STATUS, 1, VIRTQ_DESC_F_WRITE))
        for i, (addr, n, flags) in enumerate(descs):
            more = VIRTQ_DESC_F_NEXT if i + 1 < len(descs) else 0
            struct.pack_into("<QIHH", ram, DESC + 16 * i, addr, n, flags | more, i + 1)
        struct.pack_into("<H", ram, AVAIL + 4 + 2 * (self.avail % 8), 0)
        self.avail += 1
        struct.pack_into("<H", ram, AVAIL + 2, self.avail)
        self.dev.notify(0)
        assert struct.unpack_from("<H", ram, USED + 2)[0] == self.avail
        return ram[STATUS], bytes(ram[DATA : DATA + in_len])


@pytest.fixture
def disk(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(b"\xaa" * (1 << 20))
    return path


def blk(disk, **kw: object) -> tuple[VirtioBlk, Driver]:
    ram = Ram()
    dev = VirtioBlk("blk0", ram, LevelRecorder(5), BlkConfig("d", str(disk), **kw))  # type: ignore[arg-type]
    return dev, Driver(dev, ram)


def test_read_write_flush_and_the_serial(disk):
    dev, drv = blk(disk, serial="SN-1", cache="writeback")
    assert drv.request(VIRTIO_BLK_T_OUT, 2, out=b"\x11" * 1024) == (VIRTIO_BLK_S_OK, b"")
    assert disk.read_bytes()[1024:2048] == b"\x11" * 1024
    status, data = drv.request(VIRTIO_BLK_T_IN, 1, in_len=1024)
    assert status == VIRTIO_BLK_S_OK and data == b"\xaa" * 512 + b"\x11" * 512
    assert drv.request(VIRTIO_BLK_T_FLUSH, 0)[0] == VIRTIO_BLK_S_OK
    status, ident = drv.request(VIRTIO_BLK_T_GET_ID, 0, in_len=20)
    assert status == VIRTIO_BLK_S_OK and ident == b"SN-1".ljust(20, b"\0")
    assert dev.irq.pulses == 4 and dev.read(mmio.INTERRUPT_STATUS, 4) == 1
    assert struct.unpack_from("<Q", bytes(dev.device_config()))[0] == 2048  # sectors


def test_discard_punches_and_write_zeroes_zeroes(disk):
    _, drv = blk(disk)
    seg = struct.pack("<QII", 8, 16, 0)  # 8 KiB from sector 8
    assert drv.request(VIRTIO_BLK_T_DISCARD, 0, out=seg)[0] == VIRTIO_BLK_S_OK
    assert disk.read_bytes()[4096:12288] == bytes(8192)
    assert os.stat(disk).st_blocks * 512 < 1 << 20  # the hole is a hole
    seg = struct.pack("<QII", 100, 2, 0)
    assert drv.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, out=seg)[0] == VIRTIO_BLK_S_OK
    assert disk.read_bytes()[51200:52224] == bytes(1024)
    assert disk.read_bytes()[52224] == 0xAA


def test_errors_are_statuses_not_crashes(disk):
    dev, drv = blk(disk)
    assert drv.request(VIRTIO_BLK_T_IN, 2047, in_len=1024)[0] == VIRTIO_BLK_S_IOERR  # past the end
    assert drv.request(VIRTIO_BLK_T_OUT, 1 << 60, out=b"x" * 512)[0] == VIRTIO_BLK_S_IOERR
    assert drv.request(VIRTIO_BLK_T_OUT, 0, out=b"x" * 100)[0] == VIRTIO_BLK_S_IOERR  # not sectors
    assert drv.request(99, 0)[0] == VIRTIO_BLK_S_UNSUPP
    assert dev.request_errors == 4 and dev.active  # the device carries on


def test_a_read_only_drive_offers_ro_and_refuses_writes(disk):
    dev, drv = blk(disk, read_only=True)
    dev.write(mmio.DEVICE_FEATURES_SEL, 4, 0)
    assert dev.read(mmio.DEVICE_FEATURES, 4) >> VIRTIO_BLK_F_RO & 1
    assert drv.request(VIRTIO_BLK_T_OUT, 0, out=b"x" * 512)[0] == VIRTIO_BLK_S_IOERR
    seg = struct.pack("<QII", 0, 1, 0)
    assert drv.request(VIRTIO_BLK_T_DISCARD, 0, out=seg)[0] == VIRTIO_BLK_S_IOERR
    assert disk.read_bytes() == b"\xaa" * (1 << 20)


def test_a_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="drive d: cannot open"):
        VirtioBlk("blk0", Ram(), LevelRecorder(5), BlkConfig("d", str(tmp_path / "no")))


def test_features_without_version_1_are_refused(disk):
    ram = Ram()
    dev = VirtioBlk("blk0", ram, LevelRecorder(5), BlkConfig("d", str(disk)))
    dev.write(mmio.STATUS, 4, 3)
    dev.write(mmio.DRIVER_FEATURES_SEL, 4, 0)
    dev.write(mmio.DRIVER_FEATURES, 4, 1 << 9)  # FLUSH, but not VERSION_1 (bit 32)
    dev.write(mmio.STATUS, 4, 0xB)
    assert not dev.read(mmio.STATUS, 4) & mmio.FEATURES_OK
    dev.write(mmio.STATUS, 4, 0xF)
    assert not dev.active  # DRIVER_OK without FEATURES_OK does not make it live


def test_state_round_trips_through_a_new_device(disk):
    dev, drv = blk(disk)
    drv.request(VIRTIO_BLK_T_OUT, 0, out=b"y" * 512)
    state = dev.save_state()
    again = VirtioBlk("blk0", drv.ram, LevelRecorder(5), BlkConfig("d", str(disk)), state=state)
    assert again.save_state() == state and again.active
    drv.dev = again
    assert drv.request(VIRTIO_BLK_T_IN, 0, in_len=512) == (VIRTIO_BLK_S_OK, b"y" * 512)
