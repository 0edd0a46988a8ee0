"""virtio-net (virtio 1.2, 5.1) on a host tap: queue 0 receive, queue 1 transmit.

Features offered: MAC (the configuration space holds the NetSpec's MAC), STATUS (link
up while the tap works), MRG_RXBUF (a frame may span several receive buffers; the
header's num_buffers says how many), CSUM/GUEST_CSUM and HOST_/GUEST_TSO4/6: the
12-byte virtio_net_hdr_v1 is the tap's own vnet header (IFF_VNET_HDR), so partial
checksums and segmentation pass through to the host kernel, which validates them;
the tap is told (TUNSETOFFLOAD) to hand over only what the guest negotiated.

- Transmit runs on the tx queue's ioeventfd (the event loop): each chain is one frame
  with its header, written to the tap as is; a frame the tap cannot take now is
  dropped, as a NIC would.
- Receive runs on the tap fd's readable callback (the event loop): a frame goes into
  as many receive chains as it needs (one without MRG_RXBUF). With no buffers posted,
  one frame waits in kvmkit and the tap is no longer read until the driver posts
  more (the host queue then fills and drops: memory stays bounded).
- The tap going away (deleted: reads and writes fail): the link goes down
  (STATUS, with a configuration-change interrupt), frames from the guest are dropped,
  the VMM runs on. Fault sites `tap.read` / `tap.write` inject those errors.

Snapshots keep the transport and the counters; frames in flight are not state (a
network drops packets). A restored device attaches to its tap again (by name, or
the `--net-tap ID=TAP` override).
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

from kvmkit.devices.irq import IrqLine
from kvmkit.devices.tap import (
    MAX_FRAME_BYTES,
    TUN_F_CSUM,
    TUN_F_TSO4,
    TUN_F_TSO6,
    VNET_HDR_BYTES,
    Tap,
    TapError,
)
from kvmkit.devices.virtio.mmio import VirtioMmioDevice, VirtioState, pack_config
from kvmkit.devices.virtio.queue import Chain, GuestRam, Virtqueue
from kvmkit.devices.virtio.rx_buffers import give_back
from kvmkit.records import bounds

VIRTIO_ID_NET = 1
QUEUE_SIZE = 256
RX, TX = 0, 1

VIRTIO_NET_F_CSUM = 0
VIRTIO_NET_F_GUEST_CSUM = 1
VIRTIO_NET_F_MAC = 5
VIRTIO_NET_F_GUEST_TSO4 = 7
VIRTIO_NET_F_GUEST_TSO6 = 8
VIRTIO_NET_F_HOST_TSO4 = 11
VIRTIO_NET_F_HOST_TSO6 = 12
VIRTIO_NET_F_MRG_RXBUF = 15
VIRTIO_NET_F_STATUS = 16
VIRTIO_NET_S_LINK_UP = 1

OFFERED = sum(
    1 << bit
    for bit in (
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6,
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_HOST_TSO6,
        VIRTIO_NET_F_MRG_RXBUF,
        VIRTIO_NET_F_STATUS,
    )
)
MAX_TX_CHAIN = VNET_HDR_BYTES + MAX_FRAME_BYTES
RX_BUDGET = 64  # frames per tap callback, so one busy tap cannot starve the loop


class Reactor(Protocol):
    """The event loop, as the tap's reader needs it."""

    def add_reader(self, fd: int, callback: Callable[[], None], owner: str) -> None: ...

    def remove_reader(self, fd: int) -> None: ...


@dataclass(frozen=True)
class NetConfig:
    """A virtio-net device as built: the user's interface id, the tap, the MAC."""

    iface_id: str = field(metadata=bounds(1, 64))
    tap: str = field(metadata=bounds(1, 15))
    mac: str = field(metadata=bounds(17, 17))


@dataclass(frozen=True)
class NetState:
    transport: VirtioState
    rx_frames: int = field(default=0, metadata=bounds(0, None))
    tx_frames: int = field(default=0, metadata=bounds(0, None))
    rx_dropped: int = field(default=0, metadata=bounds(0, None))
    tx_dropped: int = field(default=0, metadata=bounds(0, None))


def mac_bytes(mac: str) -> bytes:
    return bytes(int(part, 16) for part in mac.split(":"))


def derived_mac(index: int) -> str:
    """The MAC of the index-th interface when the user gave none (locally administered,
    Firecracker's 06:00:ac:10:00:xx style)."""
    return f"06:00:ac:10:00:{(index + 2) & 0xFF:02x}"


class VirtioNet(VirtioMmioDevice):
    kind: ClassVar[str] = "virtio-net"
    device_id: ClassVar[int] = VIRTIO_ID_NET
    queue_sizes: ClassVar[tuple[int, ...]] = (QUEUE_SIZE, QUEUE_SIZE)
    state_version: ClassVar[int] = 1
    state_type: ClassVar[type] = NetState

    def __init__(
        self,
        name: str,
        ram: GuestRam,
        irq: IrqLine,
        config: NetConfig,
        tap: Tap,
        reactor: Reactor,
        state: NetState | None = None,
    ) -> None:
        super().__init__(name, ram, irq, OFFERED, state.transport if state else None)
        self.config = config
        self.mac = mac_bytes(config.mac)
        self.tap: Tap | None = tap
        self.reactor = reactor
        self.rx_frames = state.rx_frames if state else 0
        self.tx_frames = state.tx_frames if state else 0
        self.rx_dropped = state.rx_dropped if state else 0
        self.tx_dropped = state.tx_dropped if state else 0
        self.tap_error = ""
        self.waiting: bytes | None = None  # a frame with no receive buffer to go into
        self.reading = False
        if self.active:  # restored: offloads as the guest negotiated them
            self._set_offload()
        self._read_tap(True)

    # -- state ---------------------------------------------------------------------------
    def save_state(self) -> NetState:
        with self.lock:
            return NetState(
                self.transport_state(),
                self.rx_frames,
                self.tx_frames,
                self.rx_dropped,
                self.tx_dropped,
            )

    def summary(self) -> str:
        return (
            f"virtio-net {self.config.iface_id} on tap {self.config.tap}: {self.rx_frames}"
            f" frames in, {self.tx_frames} out, dropped {self.rx_dropped} in and"
            f" {self.tx_dropped} out"
        )

    def health(self) -> str | None:
        if self.tap_error:
            return f"{self.name}: {self.tap_error}: the guest's link is down"
        return super().health()

    @property
    def link_up(self) -> bool:
        return self.tap is not None

    def device_config(self) -> bytes:
        status = VIRTIO_NET_S_LINK_UP if self.link_up else 0
        return self.mac + pack_config("HH", status, 1)

    # -- lifecycle ---------------------------------------------------------------------------
    def device_activate(self) -> None:
        self._set_offload()

    def _set_offload(self) -> None:
        flags = 0
        if self.has_feature(VIRTIO_NET_F_GUEST_CSUM):
            flags |= TUN_F_CSUM
            if self.has_feature(VIRTIO_NET_F_GUEST_TSO4):
                flags |= TUN_F_TSO4
            if self.has_feature(VIRTIO_NET_F_GUEST_TSO6):
                flags |= TUN_F_TSO6
        if self.tap is not None:
            try:
                self.tap.set_offload(flags)
            except TapError as e:
                self._tap_gone(e)

    def device_reset(self) -> None:
        self.waiting = None
        if self.tap is not None:
            try:
                self.tap.set_offload(0)
            except TapError as e:
                self._tap_gone(e)
        self._read_tap(True)

    def release(self) -> None:
        with self.lock:
            self._read_tap(False)
            if self.tap is not None:
                self.tap.close()
                self.tap = None

    def _read_tap(self, on: bool) -> None:
        if self.tap is None:
            on = False
        if on and not self.reading:
            assert self.tap is not None
            self.reactor.add_reader(self.tap.fd, self._tap_readable, self.name)
        elif not on and self.reading and self.tap is not None:
            self.reactor.remove_reader(self.tap.fd)
        self.reading = on

    def _tap_gone(self, e: TapError) -> None:
        """The tap failed for good: link down, the guest told, frames dropped."""
        self.tap_error = str(e)
        self._read_tap(False)
        if self.tap is not None:
            self.tap.close()
            self.tap = None
        self.waiting = None
        self.config_changed()

    # -- transmit (the tx queue's doorbell) ----------------------------------------------------
    def device_queue(self, index: int) -> None:
        if index == TX:
            self._transmit(self.queues[TX])
        elif index == RX:
            self._receive()
            self._read_tap(True)

    def _transmit(self, q: Virtqueue) -> None:
        pushed = False
        while (chain := q.pop(self.ram)) is not None:
            frame = q.read_chain(self.ram, chain, MAX_TX_CHAIN + 1)
            if len(frame) <= VNET_HDR_BYTES or len(frame) > MAX_TX_CHAIN or self.tap is None:
                self.tx_dropped += 1
            else:
                try:
                    if self.tap.write_frame([frame]):
                        self.tx_frames += 1
                    else:
                        self.tx_dropped += 1
                except TapError as e:
                    self.tx_dropped += 1
                    self._tap_gone(e)
            q.push(self.ram, chain.head, 0)
            pushed = True
        if pushed:
            self.signal_used(TX)

    # -- receive (the tap's reader) --------------------------------------------------------------
    def _tap_readable(self) -> None:
        with self.lock:
            if not self.active:
                self._drain()  # no driver: frames are dropped, as on a NIC that is down
                return
            with self.guest_rules(f"{self.name} receive"):
                self._receive()

    def _drain(self) -> None:
        for _ in range(RX_BUDGET):
            if self.tap is None:
                return
            try:
                if self.tap.read_frame() is None:
                    return
            except TapError as e:
                self._tap_gone(e)
                return
            self.rx_dropped += 1

    def _receive(self) -> None:
        """Move frames from the tap into receive buffers while both last."""
        q = self.queues[RX]
        delivered = False
        for _ in range(RX_BUDGET):
            frame = self.waiting
            if frame is None and self.tap is not None:
                try:
                    frame = self.tap.read_frame()
                except TapError as e:
                    self._tap_gone(e)
                    break
            if frame is None:
                break
            placed = self._place(q, frame)
            if placed is None:  # no buffer: hold the frame, stop reading the tap
                self.waiting = frame
                self._read_tap(False)
                break
            self.waiting = None
            delivered |= placed
        if delivered:
            self.signal_used(RX)

    def _place(self, q: Virtqueue, frame: bytes) -> bool | None:
        """Write one frame (tap header first) into receive chains: True when delivered,
        False when dropped (too big for a lone buffer), None when buffers ran out."""
        if len(frame) <= VNET_HDR_BYTES:
            self.rx_dropped += 1
            return False
        header = bytearray(frame[:VNET_HDR_BYTES])
        if not self.has_feature(VIRTIO_NET_F_GUEST_CSUM):
            header[:10] = bytes(10)  # nothing to tell without the offloads negotiated
        merge = self.has_feature(VIRTIO_NET_F_MRG_RXBUF)
        chains: list[Chain] = []
        room = 0
        while room < len(frame):
            chain = q.pop(self.ram)
            if chain is None:
                give_back(q, self.ram, len(chains))
                return None
            chains.append(chain)
            room += chain.writable_bytes
            if not merge:
                break
        if room < len(frame):
            give_back(q, self.ram, len(chains))
            self.rx_dropped += 1
            return False
        header[10:12] = len(chains).to_bytes(2, "little") if merge else b"\x00\x00"
        data = bytes(header) + frame[VNET_HDR_BYTES:]
        done = 0
        for chain in chains:
            n = q.write_chain(self.ram, chain, data[done : done + chain.writable_bytes])
            q.push(self.ram, chain.head, n)
            done += n
        self.rx_frames += 1
        return True
