"""virtio-blk (virtio 1.2, 5.2): a disk backed by a raw file or block device.

One request queue. Each request is a chain: a 16-byte header (type, reserved,
sector) the driver reads out, the data, and one status byte the device writes last.
Supported: IN (read), OUT (write), FLUSH (fsync with cache=writeback; a no-op with
cache=unsafe), GET_ID (the serial, 20 bytes), DISCARD (fallocate PUNCH_HOLE) and
WRITE_ZEROES (fallocate ZERO_RANGE, or PUNCH_HOLE with the unmap flag). A read-only
drive offers VIRTIO_BLK_F_RO and answers writes, discards and write-zeroes with
IOERR. Every failure of the backing file (EIO, ENOSPC, ...) and every request
outside the disk is VIRTIO_BLK_S_IOERR to the guest, never an error of the VMM.

Requests are completed inside the queue callback (synchronous preadv/pwritev straight
into and out of guest RAM), so a quiesced event loop means no request is in flight:
a snapshot needs nothing more. Fault sites: `blk.read`, `blk.write` (kvmkit/faults).
"""

import errno
import os
import struct
from dataclasses import dataclass, field
from typing import ClassVar

from kvmkit import faults, libc
from kvmkit.devices.irq import IrqLine
from kvmkit.devices.virtio.mmio import VirtioMmioDevice, VirtioState
from kvmkit.devices.virtio.queue import Chain, GuestRam, QueueError
from kvmkit.errors import ConfigError
from kvmkit.records import bounds

VIRTIO_ID_BLOCK = 2
QUEUE_SIZE = 256
SECTOR = 512
SEG_MAX = QUEUE_SIZE - 2  # data descriptors per request: with header and status, a ring

VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9
VIRTIO_BLK_F_DISCARD = 13
VIRTIO_BLK_F_WRITE_ZEROES = 14

VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_T_DISCARD = 11
VIRTIO_BLK_T_WRITE_ZEROES = 13

VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2

ID_BYTES = 20
HEADER = struct.Struct("<IIQ")
SEGMENT = struct.Struct("<QII")  # discard / write-zeroes: sector, num_sectors, flags
WRITE_ZEROES_UNMAP = 1
MAX_SEGMENTS = 1  # discard / write-zeroes ranges per request we advertise
MAX_RANGE_SECTORS = (1 << 32) - 1


@dataclass(frozen=True)
class BlkConfig:
    """A drive as the machine was built with it (saved with the machine)."""

    drive_id: str = field(metadata=bounds(1, 64))
    path: str = field(metadata=bounds(1, 4096))
    read_only: bool = False
    root: bool = False
    serial: str = field(default="", metadata=bounds(0, ID_BYTES))
    cache: str = field(default="unsafe", metadata=bounds(1, 16))

    @classmethod
    def from_spec(cls, spec: object) -> "BlkConfig":
        """From a kvmkit.machine.resources.DriveSpec (duck-typed: devices sit below)."""
        drive_id: str = getattr(spec, "drive_id")  # noqa: B009
        serial = getattr(spec, "serial", None)  # noqa: B009
        return cls(
            drive_id=drive_id,
            path=os.path.abspath(getattr(spec, "path")),  # noqa: B009
            read_only=bool(getattr(spec, "read_only")),  # noqa: B009
            root=bool(getattr(spec, "root")),  # noqa: B009
            serial=serial if serial is not None else drive_id[:ID_BYTES],
            cache=getattr(spec, "cache"),  # noqa: B009
        )


@dataclass(frozen=True)
class BlkState:
    transport: VirtioState
    requests: int = field(default=0, metadata=bounds(0, None))
    errors: int = field(default=0, metadata=bounds(0, None))
    capacity: int = field(default=0, metadata=bounds(0, None))  # bytes the guest was told


class RequestError(Exception):
    """A request that fails with a status for the guest (not a driver error)."""

    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status


def open_backing(drive_id: str, path: str, read_only: bool) -> tuple[int, int]:
    """Open a drive's file; (fd, capacity in bytes, whole sectors). O_NONBLOCK: a FIFO
    given as a disk is refused (it cannot be sized) instead of waiting for a writer; on
    files and block devices it changes nothing."""
    flags = os.O_RDONLY if read_only else os.O_RDWR
    try:
        fd = os.open(path, flags | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise ConfigError(f"drive {drive_id}: cannot open {path}: {e.strerror}") from None
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
    except OSError as e:
        os.close(fd)
        raise ConfigError(f"drive {drive_id}: cannot size {path}: {e.strerror}") from None
    return fd, size - size % SECTOR


class VirtioBlk(VirtioMmioDevice):
    kind: ClassVar[str] = "virtio-blk"
    device_id: ClassVar[int] = VIRTIO_ID_BLOCK
    queue_sizes: ClassVar[tuple[int, ...]] = (QUEUE_SIZE,)
    state_version: ClassVar[int] = 1
    state_type: ClassVar[type] = BlkState

    def __init__(
        self,
        name: str,
        ram: GuestRam,
        irq: IrqLine,
        config: BlkConfig,
        path: str | None = None,
        state: BlkState | None = None,
    ) -> None:
        """`path`: the backing file to open (default: the config's; a restore may name
        a replacement)."""
        self.config = config
        self.path = path or config.path
        self.fd, self.capacity = open_backing(config.drive_id, self.path, config.read_only)
        if state is not None and state.capacity and state.capacity != self.capacity:
            os.close(self.fd)
            raise ConfigError(
                f"drive {config.drive_id}: {self.path} holds {self.capacity} bytes, but the"
                f" saved guest's disk had {state.capacity}: give a file of the same size"
            )
        features = 1 << VIRTIO_BLK_F_SEG_MAX | 1 << VIRTIO_BLK_F_BLK_SIZE | 1 << VIRTIO_BLK_F_FLUSH
        if config.read_only:
            features |= 1 << VIRTIO_BLK_F_RO
        else:
            features |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES
        try:
            super().__init__(name, ram, irq, features, state.transport if state else None)
        except BaseException:
            os.close(self.fd)
            raise
        self.requests = state.requests if state else 0
        self.request_errors = state.errors if state else 0

    def save_state(self) -> BlkState:
        return BlkState(self.transport_state(), self.requests, self.request_errors, self.capacity)

    def summary(self) -> str:
        ro = ", read-only" if self.config.read_only else ""
        errors = f", {self.request_errors} failed" if self.request_errors else ""
        return (
            f"virtio-blk {self.config.drive_id}: {self.path}{ro}, {self.requests} requests{errors}"
        )

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # -- configuration space (5.2.4) ------------------------------------------------------
    def device_config(self) -> bytes:
        max_sectors = MAX_RANGE_SECTORS
        return struct.pack(
            "<QIIHBBIBBHIBBHIIIIIB3x",
            self.capacity // SECTOR,  # capacity
            0,  # size_max (no F_SIZE_MAX)
            SEG_MAX,
            0,  # geometry: cylinders, heads, sectors
            0,
            0,
            SECTOR,  # blk_size
            0,  # topology: physical_block_exp, alignment_offset, min_io_size, opt_io_size
            0,
            0,
            0,
            0,  # writeback
            0,
            1,  # num_queues
            max_sectors,  # max_discard_sectors
            MAX_SEGMENTS,  # max_discard_seg
            1,  # discard_sector_alignment
            max_sectors,  # max_write_zeroes_sectors
            MAX_SEGMENTS,  # max_write_zeroes_seg
            1,  # write_zeroes_may_unmap
        )

    # -- requests ---------------------------------------------------------------------
    def device_queue(self, index: int) -> None:
        q = self.queues[index]
        pushed = False
        while (chain := q.pop(self.ram)) is not None:
            written = self._request(chain)
            q.push(self.ram, chain.head, written)
            pushed = True
        if pushed:
            self.signal_used(index)

    def _request(self, chain: Chain) -> int:
        """Serve one request; the bytes written into the chain (data + status)."""
        if chain.readable_bytes < HEADER.size or not chain.writable_bytes:
            raise QueueError(
                f"{self.name}: a request needs a 16-byte header and a status byte"
                f" (got {chain.readable_bytes} readable, {chain.writable_bytes} writable)"
            )
        kind, _, sector = HEADER.unpack(self._read(chain, 0, HEADER.size))
        self.requests += 1
        data_in = chain.writable_bytes - 1  # device-writable bytes before the status
        written = 0
        try:
            if kind == VIRTIO_BLK_T_IN:
                written = self._read_disk(chain, sector, data_in)
            elif kind == VIRTIO_BLK_T_OUT:
                self._write_disk(chain, sector, chain.readable_bytes - HEADER.size)
            elif kind == VIRTIO_BLK_T_FLUSH:
                self._flush()
            elif kind == VIRTIO_BLK_T_GET_ID:
                ident = self.config.serial.encode()[:ID_BYTES].ljust(ID_BYTES, b"\0")
                written = self._write_guest(chain, 0, ident[: min(ID_BYTES, data_in)])
            elif kind in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES):
                self._ranges(chain, kind)
            else:
                raise RequestError(VIRTIO_BLK_S_UNSUPP, f"request type {kind}")
            status = VIRTIO_BLK_S_OK
        except RequestError as e:
            status = e.status
            self.request_errors += 1
        except OSError:
            status = VIRTIO_BLK_S_IOERR
            self.request_errors += 1
        self._write_guest(chain, data_in, bytes([status]))
        return written + 1

    def _check_range(self, sector: int, length: int) -> int:
        offset = sector * SECTOR
        if length % SECTOR or offset + length > self.capacity:
            raise RequestError(
                VIRTIO_BLK_S_IOERR,
                f"sectors {sector}+{length // SECTOR} outside the disk's {self.capacity // SECTOR}",
            )
        return offset

    def _read_disk(self, chain: Chain, sector: int, length: int) -> int:
        offset = self._check_range(sector, length)
        views = self._views(chain.writable, 0, length)
        faults.inject("blk.read")
        done = os.preadv(self.fd, views, offset) if views else 0
        if done != length:
            raise OSError(errno.EIO, "short read")
        return length

    def _write_disk(self, chain: Chain, sector: int, length: int) -> None:
        if self.config.read_only:
            raise RequestError(VIRTIO_BLK_S_IOERR, "read-only drive")
        offset = self._check_range(sector, length)
        views = self._views(chain.readable, HEADER.size, length)
        faults.inject("blk.write")
        done = 0
        while done < length:  # pwritev may write less (a signal, a full disk)
            n = os.pwritev(self.fd, _skip(views, done), offset + done)
            if n <= 0:
                raise OSError(errno.ENOSPC, "no progress")
            done += n

    def _flush(self) -> None:
        if self.config.cache == "writeback" and not self.config.read_only:
            faults.inject("blk.write")
            os.fsync(self.fd)

    def _ranges(self, chain: Chain, kind: int) -> None:
        if self.config.read_only:
            raise RequestError(VIRTIO_BLK_S_IOERR, "read-only drive")
        body = chain.readable_bytes - HEADER.size
        if body != SEGMENT.size * MAX_SEGMENTS:
            raise RequestError(VIRTIO_BLK_S_UNSUPP, f"{body} bytes of ranges")
        sector, count, flags = SEGMENT.unpack(self._read(chain, HEADER.size, SEGMENT.size))
        if flags & ~WRITE_ZEROES_UNMAP or (kind == VIRTIO_BLK_T_DISCARD and flags):
            raise RequestError(VIRTIO_BLK_S_UNSUPP, f"range flags {flags:#x}")
        offset = self._check_range(sector, count * SECTOR)
        if not count:
            return
        faults.inject("blk.write")
        punch = kind == VIRTIO_BLK_T_DISCARD or flags & WRITE_ZEROES_UNMAP
        mode = (
            libc.FALLOC_FL_PUNCH_HOLE | libc.FALLOC_FL_KEEP_SIZE
            if punch
            else libc.FALLOC_FL_ZERO_RANGE | libc.FALLOC_FL_KEEP_SIZE
        )
        try:
            libc.fallocate(self.fd, mode, offset, count * SECTOR)
        except OSError as e:
            if kind == VIRTIO_BLK_T_DISCARD or e.errno not in (errno.EOPNOTSUPP, errno.ENODEV):
                raise
            self._write_zeroes(offset, count * SECTOR)  # a block device: write them

    def _write_zeroes(self, offset: int, length: int) -> None:
        zeros = bytes(min(length, 1 << 20))
        done = 0
        while done < length:
            done += os.pwrite(self.fd, zeros[: length - done], offset + done)

    # -- guest buffers ----------------------------------------------------------------
    def _views(self, ranges: list[tuple[int, int]], skip: int, length: int) -> list[memoryview]:
        """Views of `length` bytes of `ranges` starting `skip` bytes in."""
        out = []
        for gpa, n in ranges:
            if skip >= n:
                skip -= n
                continue
            take = min(n - skip, length)
            if take <= 0:
                break
            out.append(self.ram.view(gpa + skip, take))
            length -= take
            skip = 0
        return out

    def _read(self, chain: Chain, skip: int, length: int) -> bytes:
        return b"".join(bytes(v) for v in self._views(chain.readable, skip, length))

    def _write_guest(self, chain: Chain, skip: int, data: bytes) -> int:
        done = 0
        for view in self._views(chain.writable, skip, len(data)):
            view[:] = data[done : done + len(view)]
            done += len(view)
        return done


def _skip(views: list[memoryview], n: int) -> list[memoryview]:
    out = []
    for v in views:
        if n >= len(v):
            n -= len(v)
            continue
        out.append(v[n:])
        n = 0
    return out
