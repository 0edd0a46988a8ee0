"""The virtio-mmio transport (virtio 1.2, 4.2.2), modern only (Version 2).

`VirtioMmioDevice` is the transport and the base class of every virtio device kind:
the registers at 0x000-0x0fc, the device's configuration space from 0x100, feature
negotiation (VIRTIO_F_VERSION_1 required), the device status and reset, the queue
registers and the interrupt status. A kind subclasses it (see the package docstring).

Threads: register reads and writes come from vCPU threads (MMIO exits); queue
notifications come from the event loop (`notify`, run by the QueueNotify ioeventfd,
so a doorbell never exits to Python). One lock serialises both.

Driver errors (a bad queue, a buffer outside RAM, ...) never reach the VMM: the
device sets DEVICE_NEEDS_RESET in its status, raises a configuration-change
interrupt and ignores its queues until the driver resets it (writes 0 to Status).
"""

import contextlib
import functools
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

from kvmkit.devices.irq import IrqLine
from kvmkit.devices.virtio.queue import GuestRam, QueueError, QueueState, Virtqueue
from kvmkit.errors import KvmkitError
from kvmkit.records import U8, U32, U64, bounds

MMIO_SIZE = 0x1000
MAGIC = 0x7472_6976  # "virt"
VERSION = 2
VENDOR_ID = 0x4B4D_564B  # "KVMK"

# Register offsets (virtio 1.2, 4.2.2).
MAGIC_VALUE = 0x000
VERSION_REG = 0x004
DEVICE_ID = 0x008
VENDOR_ID_REG = 0x00C
DEVICE_FEATURES = 0x010
DEVICE_FEATURES_SEL = 0x014
DRIVER_FEATURES = 0x020
DRIVER_FEATURES_SEL = 0x024
QUEUE_SEL = 0x030
QUEUE_NUM_MAX = 0x034
QUEUE_NUM = 0x038
QUEUE_READY = 0x044
QUEUE_NOTIFY = 0x050
INTERRUPT_STATUS = 0x060
INTERRUPT_ACK = 0x064
STATUS = 0x070
QUEUE_DESC_LOW = 0x080
QUEUE_DESC_HIGH = 0x084
QUEUE_DRIVER_LOW = 0x090
QUEUE_DRIVER_HIGH = 0x094
QUEUE_DEVICE_LOW = 0x0A0
QUEUE_DEVICE_HIGH = 0x0A4
SHM_LEN_LOW = 0x0B0
SHM_LEN_HIGH = 0x0B4
CONFIG_GENERATION = 0x0FC
CONFIG = 0x100

# Device status bits (2.1).
ACKNOWLEDGE = 1
DRIVER = 2
DRIVER_OK = 4
FEATURES_OK = 8
DEVICE_NEEDS_RESET = 0x40
FAILED = 0x80

# Interrupt status bits (4.2.2).
INT_USED_BUFFER = 1
INT_CONFIG_CHANGE = 2

# Transport feature bits (6).
VIRTIO_F_INDIRECT_DESC = 28
VIRTIO_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32
TRANSPORT_FEATURES = (
    (1 << VIRTIO_F_INDIRECT_DESC) | (1 << VIRTIO_F_EVENT_IDX) | (1 << VIRTIO_F_VERSION_1)
)

MAX_QUEUES = 64


@dataclass(frozen=True)
class VirtioState:
    """The transport's state: what the driver negotiated and set up, and the queues."""

    status: int = field(default=0, metadata=bounds(*U8))
    device_features_sel: int = field(default=0, metadata=bounds(*U32))
    driver_features_sel: int = field(default=0, metadata=bounds(*U32))
    driver_features: int = field(default=0, metadata=bounds(*U64))
    queue_sel: int = field(default=0, metadata=bounds(*U32))
    interrupt_status: int = field(default=0, metadata=bounds(0, 3))
    config_generation: int = field(default=0, metadata=bounds(*U32))
    queues: list[QueueState] = field(default_factory=list, metadata=bounds(0, MAX_QUEUES))
    errors: int = field(default=0, metadata=bounds(0, None))
    last_error: str = field(default="", metadata=bounds(0, 512))


class VirtioMmioDevice:
    """A virtio device on the MMIO transport. Subclasses set the class attributes and
    override the `device_*` hooks; see kvmkit/devices/virtio/__init__.py."""

    kind: ClassVar[str] = ""  # the DevicePlacementRecord kind ("virtio-blk")
    device_id: ClassVar[int] = 0  # the virtio device ID (2 blk, 4 rng, 5 balloon)
    queue_sizes: ClassVar[tuple[int, ...]] = ()  # QueueNumMax of each queue
    state_version: ClassVar[int] = 1
    state_type: ClassVar[type] = object

    def __init__(
        self,
        name: str,
        ram: GuestRam,
        irq: IrqLine,
        features: int,
        state: VirtioState | None = None,
        queue_sizes: tuple[int, ...] | None = None,
    ) -> None:
        """`features`: the device-specific feature bits offered (transport bits are
        added here). `state`: the saved transport state of a restored device.
        `queue_sizes`: this instance's queues, when they depend on its configuration
        (default: the class's `queue_sizes`)."""
        self._name = name
        self.ram = ram
        self.irq = irq
        self.device_features = features | TRANSPORT_FEATURES
        self.lock = threading.RLock()
        self.defer: Callable[[Callable[[], None]], None] = lambda f: f()
        sizes = self.queue_sizes if queue_sizes is None else queue_sizes
        self.queues = [Virtqueue(f"{name} queue {i}", n) for i, n in enumerate(sizes)]
        s = state or VirtioState()
        if state is not None and len(s.queues) != len(self.queues):
            raise KvmkitError(
                f"{name}: saved state has {len(s.queues)} queues, this device has"
                f" {len(self.queues)}"
            )
        self.status = s.status
        self.device_features_sel = s.device_features_sel
        self.driver_features_sel = s.driver_features_sel
        self.driver_features = s.driver_features
        self.queue_sel = s.queue_sel
        self.interrupt_status = s.interrupt_status
        self.config_generation = s.config_generation
        self.errors = s.errors
        self.last_error = s.last_error
        for i, (q, qs) in enumerate(zip(self.queues, s.queues, strict=False)):
            n = qs.size
            if qs.ready and (not 1 <= n <= q.max_size or n & (n - 1)):
                raise KvmkitError(
                    f"{name}: saved queue {i} is ready with size {n}, which this device"
                    f" cannot have (powers of two up to {q.max_size})"
                )
            q.load(qs)
        self._apply_features()

    # -- the Device protocol -------------------------------------------------------------
    @property
    def name(self) -> str:
        return self._name

    def save_state(self) -> Any:  # noqa: ANN401 (the kind's state record)
        raise NotImplementedError

    def transport_state(self) -> VirtioState:
        with self.lock:
            return VirtioState(
                self.status,
                self.device_features_sel,
                self.driver_features_sel,
                self.driver_features,
                self.queue_sel,
                self.interrupt_status,
                self.config_generation,
                [q.save() for q in self.queues],
                self.errors,
                self.last_error,
            )

    # -- hooks for device kinds ----------------------------------------------------------
    def device_config(self) -> bytes:
        """The device's configuration space (read at 0x100 onwards)."""
        return b""

    def device_config_write(self, offset: int, data: bytes) -> None:
        """The driver wrote `data` at `offset` of the configuration space."""

    def device_queue(self, index: int) -> None:
        """Queue `index` has new buffers (called on the event loop, under `lock`)."""

    def device_activate(self) -> None:
        """The driver set DRIVER_OK: features are final, queues set up."""

    def device_reset(self) -> None:
        """The driver reset the device: forget everything it set up."""

    def host_readers(self) -> list[tuple[int, Callable[[], None]]]:
        """Host fds (a tap, a socket, a timerfd) whose callbacks the event loop runs
        when readable; registered once the device is placed. Callbacks take `lock`."""
        return []

    def summary(self) -> str:
        """One line for the run summary: what the device did."""
        return self.kind

    def health(self) -> str | None:
        """Why the device stopped serving its driver, if it did."""
        if self.status & DEVICE_NEEDS_RESET:
            return (
                f"{self.name}: the guest's driver broke the virtio rules ({self.last_error});"
                " the device ignores its queues until the driver resets it"
            )
        return None

    def release(self) -> None:
        """Release host resources (files, sockets); the device manager calls it at
        close, after the doorbells are gone."""

    # -- helpers for device kinds --------------------------------------------------------
    def has_feature(self, bit: int) -> bool:
        return bool(self.driver_features >> bit & 1)

    @property
    def active(self) -> bool:
        return self.status & (DRIVER_OK | DEVICE_NEEDS_RESET | FAILED) == DRIVER_OK

    def signal_used(self, index: int) -> None:
        """Raise the used-buffer interrupt if queue `index`'s driver wants one."""
        try:
            wanted = self.queues[index].should_interrupt(self.ram)
        except QueueError as e:
            self.fail(str(e))
            return
        if wanted:
            self.interrupt_status |= INT_USED_BUFFER
            self.irq.pulse()

    def config_changed(self) -> None:
        """The device changed its configuration space: a new generation, an interrupt."""
        with self.lock:
            self.config_generation = (self.config_generation + 1) & 0xFFFF_FFFF
            if self.status & DRIVER_OK:
                self.interrupt_status |= INT_CONFIG_CHANGE
                self.irq.pulse()

    def fail(self, why: str) -> None:
        """The driver broke the rules: DEVICE_NEEDS_RESET, and the queues are ignored."""
        self.errors += 1
        self.last_error = why[:512]
        if not self.status & DEVICE_NEEDS_RESET:
            self.status |= DEVICE_NEEDS_RESET
            if self.status & DRIVER_OK:
                self.interrupt_status |= INT_CONFIG_CHANGE
                self.irq.pulse()

    # -- notification (event loop) --------------------------------------------------------
    def notify(self, index: int) -> None:
        """Queue `index` was notified (QueueNotify): process it if the device is live."""
        with self.lock:
            if not self.active or not 0 <= index < len(self.queues):
                return  # before DRIVER_OK, after an error, or no such queue: ignored
            if not self.queues[index].ready:
                return
            with self.guest_rules(f"{self.name} queue {index}"):
                self.device_queue(index)

    @contextlib.contextmanager
    def guest_rules(self, where: str) -> Iterator[None]:
        """Work on the driver's rings (a notification, a host fd that became ready): a
        ring the driver broke sets NEEDS_RESET; it never stops the machine."""
        try:
            yield
        except QueueError as e:
            self.fail(str(e))
        except KvmkitError as e:  # guest RAM the walker let through, then refused
            self.fail(f"{where}: {e}")

    # -- registers (vCPU threads) ---------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        with self.lock:
            if offset >= CONFIG:
                data = self.device_config()
                rel = offset - CONFIG
                if rel + size > len(data):
                    return 0
                return int.from_bytes(data[rel : rel + size], "little")
            if size != 4 or offset % 4:
                return 0
            return self._register(offset)

    def _register(self, offset: int) -> int:
        q = self._selected()
        if offset == MAGIC_VALUE:
            return MAGIC
        if offset == VERSION_REG:
            return VERSION
        if offset == DEVICE_ID:
            return self.device_id
        if offset == VENDOR_ID_REG:
            return VENDOR_ID
        if offset == DEVICE_FEATURES:
            sel = self.device_features_sel
            return self.device_features >> (32 * sel) & 0xFFFF_FFFF if sel < 2 else 0
        if offset == QUEUE_NUM_MAX:
            return q.max_size if q is not None else 0
        if offset == QUEUE_READY:
            return int(q.ready) if q is not None else 0
        if offset == INTERRUPT_STATUS:
            return self.interrupt_status
        if offset == STATUS:
            return self.status
        if offset in (SHM_LEN_LOW, SHM_LEN_HIGH):
            return 0xFFFF_FFFF  # no shared memory regions
        if offset == CONFIG_GENERATION:
            return self.config_generation
        return 0

    def _selected(self) -> Virtqueue | None:
        return self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None

    def write(self, offset: int, size: int, value: int) -> None:
        with self.lock:
            if offset >= CONFIG:
                rel = offset - CONFIG
                if rel + size <= len(self.device_config()):
                    self.device_config_write(rel, value.to_bytes(size, "little"))
                return
            if size != 4 or offset % 4:
                return
            if offset == QUEUE_NOTIFY:
                # Only a write the ioeventfds did not match lands here (a queue index
                # past the device's): still served on the event loop, never here.
                self.defer(lambda: self.notify(value & 0xFFFF))
                return
            self._write_register(offset, value & 0xFFFF_FFFF)

    def _write_register(self, offset: int, value: int) -> None:
        q = self._selected()
        if offset == DEVICE_FEATURES_SEL:
            self.device_features_sel = value
        elif offset == DRIVER_FEATURES_SEL:
            self.driver_features_sel = value
        elif offset == DRIVER_FEATURES:
            sel = self.driver_features_sel
            if sel < 2 and self.status & (DRIVER | FEATURES_OK) == DRIVER:
                mask = 0xFFFF_FFFF << (32 * sel)
                self.driver_features = self.driver_features & ~mask | value << (32 * sel)
        elif offset == QUEUE_SEL:
            self.queue_sel = value
        elif offset == INTERRUPT_ACK:
            self.interrupt_status &= ~value
        elif offset == STATUS:
            self._write_status(value & 0xFF)
        elif q is not None and not q.ready:
            self._write_queue(q, offset, value)
        elif q is not None and offset == QUEUE_READY and not value:
            q.ready = False

    def _write_queue(self, q: Virtqueue, offset: int, value: int) -> None:
        if offset == QUEUE_NUM:
            q.size = min(value, 0xFFFF)
        elif offset == QUEUE_READY and value:
            try:
                q.check(self.ram)
            except QueueError as e:
                self.fail(str(e))
                return
            q.ready = True
        elif offset in (QUEUE_DESC_LOW, QUEUE_DESC_HIGH):
            q.desc = _set_half(q.desc, value, offset == QUEUE_DESC_HIGH)
        elif offset in (QUEUE_DRIVER_LOW, QUEUE_DRIVER_HIGH):
            q.avail = _set_half(q.avail, value, offset == QUEUE_DRIVER_HIGH)
        elif offset in (QUEUE_DEVICE_LOW, QUEUE_DEVICE_HIGH):
            q.used = _set_half(q.used, value, offset == QUEUE_DEVICE_HIGH)

    def _write_status(self, value: int) -> None:
        if value == 0:
            self._reset()
            return
        new = value & ~self.status
        if new & FEATURES_OK:
            offered = self.device_features
            if self.driver_features & ~offered or not self.has_feature(VIRTIO_F_VERSION_1):
                value &= ~FEATURES_OK  # refused: the driver reads it back cleared
            else:
                self._apply_features()
        if new & DRIVER_OK and not value & FEATURES_OK:
            value &= ~DRIVER_OK
        # DEVICE_NEEDS_RESET is the device's to set; the driver cannot clear it but by reset.
        self.status = value & ~DEVICE_NEEDS_RESET | self.status & DEVICE_NEEDS_RESET
        if new & DRIVER_OK and self.active:
            self.device_activate()
            for i, q in enumerate(self.queues):  # buffers made available before DRIVER_OK
                if q.ready:
                    self.defer(functools.partial(self.notify, i))

    def _apply_features(self) -> None:
        for q in self.queues:
            q.event_idx = self.has_feature(VIRTIO_F_EVENT_IDX)
            q.indirect = self.has_feature(VIRTIO_F_INDIRECT_DESC)

    def _reset(self) -> None:
        self.status = 0
        self.driver_features = 0
        self.device_features_sel = self.driver_features_sel = 0
        self.queue_sel = 0
        self.interrupt_status = 0
        for q in self.queues:
            q.reset()
        self._apply_features()
        self.device_reset()


def _set_half(old: int, value: int, high: bool) -> int:
    if high:
        return old & 0xFFFF_FFFF | value << 32
    return old & ~0xFFFF_FFFF | value


def pack_config(fmt: str, *values: int) -> bytes:
    """Little-endian configuration space bytes (`struct` format without the '<')."""
    return struct.pack("<" + fmt, *values)
