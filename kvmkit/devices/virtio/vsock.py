"""virtio-vsock (virtio 1.2, 5.10): queue 0 receive, 1 transmit, 2 events; the
configuration space is the guest's CID (le64). The host side is a hybrid vsock
(vsock_host.py): guest streams are carried over host unix sockets.

- Transmit (the tx doorbell, on the event loop): each chain is a 44-byte header and
  its payload (at most 64 KiB; a chain that says more, or holds less than its header
  says, is dropped), handed to the host side; then receive buffers are filled.
- Receive: whenever the host side has packets (a host socket event, or after
  transmit) and the driver has posted buffers, one packet per chain.
- Events: after a restore the host sockets of the saved streams are gone, so the
  device sends VIRTIO_VSOCK_EVENT_TRANSPORT_RESET as soon as the restored machine
  runs: the guest resets its streams (ECONNRESET) and listening sockets stay; new
  streams work at once (Firecracker does the same).

Snapshots keep the transport only: streams are host connections, not guest state.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

from kvmkit.devices.irq import IrqLine
from kvmkit.devices.virtio.mmio import VirtioMmioDevice, VirtioState, pack_config
from kvmkit.devices.virtio.queue import GuestRam
from kvmkit.devices.virtio.rx_buffers import give_back
from kvmkit.devices.virtio.vsock_conn import HEADER_BYTES, MAX_PAYLOAD_BYTES, Header
from kvmkit.devices.virtio.vsock_host import FdWatcher, HybridVsockHost
from kvmkit.records import U64, bounds

VIRTIO_ID_VSOCK = 19
RX, TX, EVENT = 0, 1, 2
QUEUE_SIZES = (256, 256, 16)
EVENT_TRANSPORT_RESET = 0


@dataclass(frozen=True)
class VsockConfig:
    """The guest's CID and the host unix socket path (`<uds>_P` for guest streams)."""

    cid: int = field(metadata=bounds(3, U64[1]))
    uds: str = field(metadata=bounds(1, 107))


@dataclass(frozen=True)
class VsockState:
    transport: VirtioState
    resets: int = field(default=0, metadata=bounds(0, None))


class Loop(FdWatcher, Protocol):
    """The machine's event loop: host sockets, and work for when the machine runs."""

    def call_soon(self, callback: Callable[[], None]) -> None: ...


class VirtioVsock(VirtioMmioDevice):
    kind: ClassVar[str] = "virtio-vsock"
    device_id: ClassVar[int] = VIRTIO_ID_VSOCK
    queue_sizes: ClassVar[tuple[int, ...]] = QUEUE_SIZES
    state_version: ClassVar[int] = 1
    state_type: ClassVar[type] = VsockState

    def __init__(
        self,
        name: str,
        ram: GuestRam,
        irq: IrqLine,
        config: VsockConfig,
        loop: Loop,
        state: VsockState | None = None,
    ) -> None:
        super().__init__(name, ram, irq, 0, state.transport if state else None)
        self.config = config
        self.host = HybridVsockHost(name, config.cid, config.uds, loop, self.lock, self._host_ready)
        self.host.start()
        self.resets = state.resets if state else 0
        # A restored guest holds streams whose host ends are gone: tell it once it runs.
        self.reset_pending = state is not None and self.active
        if self.reset_pending:
            loop.call_soon(self._send_reset)

    def save_state(self) -> VsockState:
        with self.lock:
            return VsockState(self.transport_state(), self.resets + self.host.resets)

    def summary(self) -> str:
        h = self.host
        return (
            f"virtio-vsock cid {self.config.cid} at {self.config.uds}: {h.opened} streams"
            f" opened, {h.resets} reset by kvmkit, {h.refused} guest connections refused"
            " (nobody listening)"
        )

    def device_config(self) -> bytes:
        return pack_config("Q", self.config.cid)

    # -- lifecycle ---------------------------------------------------------------------------
    def device_reset(self) -> None:
        self.host.drop_streams()
        self.reset_pending = False

    def release(self) -> None:
        with self.lock:
            self.host.close()

    # -- queues ------------------------------------------------------------------------------
    def device_queue(self, index: int) -> None:
        if index == TX:
            self._transmit()
        elif index == EVENT:
            self._send_reset()
        self._fill_rx()

    def _transmit(self) -> None:
        q = self.queues[TX]
        pushed = False
        while (chain := q.pop(self.ram)) is not None:
            data = q.read_chain(self.ram, chain, HEADER_BYTES + MAX_PAYLOAD_BYTES)
            q.push(self.ram, chain.head, 0)
            pushed = True
            if len(data) < HEADER_BYTES:
                continue
            h = Header.unpack(data)
            payload = data[HEADER_BYTES : HEADER_BYTES + h.len]
            if h.len > MAX_PAYLOAD_BYTES or len(payload) != h.len:
                continue  # malformed: dropped
            self.host.from_guest(h, payload)
        if pushed:
            self.signal_used(TX)

    def _host_ready(self) -> None:
        with self.lock, self.guest_rules(f"{self.name} receive"):
            if self.active:
                self._fill_rx()

    def _fill_rx(self) -> None:
        q = self.queues[RX]
        pushed = False
        while self.host.has_for_guest:
            chain = q.pop(self.ram)
            if chain is None:
                break  # the driver's next rx notification carries on
            room = chain.writable_bytes - HEADER_BYTES
            if room < 0:
                self.fail(
                    f"{self.name}: a receive buffer of {chain.writable_bytes} bytes has no"
                    " room for a packet header"
                )
                return
            packet = self.host.packet_for_guest(room)
            if packet is None:
                give_back(q, self.ram, 1)
                break
            h, payload = packet
            n = q.write_chain(self.ram, chain, h.pack() + payload)
            q.push(self.ram, chain.head, n)
            pushed = True
        if pushed:
            self.signal_used(RX)

    def _send_reset(self) -> None:
        with self.lock, self.guest_rules(f"{self.name} event queue"):
            if not self.reset_pending or not self.active:
                return
            q = self.queues[EVENT]
            if not q.ready:
                return
            chain = q.pop(self.ram)
            if chain is None:
                return  # sent when the driver posts an event buffer
            n = q.write_chain(self.ram, chain, EVENT_TRANSPORT_RESET.to_bytes(4, "little"))
            q.push(self.ram, chain.head, n)
            self.reset_pending = False
            self.resets += 1
            self.signal_used(EVENT)
