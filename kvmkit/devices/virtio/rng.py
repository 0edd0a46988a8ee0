"""virtio-rng (virtio 1.2, 5.4): one request queue; the device fills each writable
buffer with bytes from the host's getrandom(). No configuration space, no features.

A request asks for at most `MAX_REQUEST_BYTES` per chain (Linux asks for 16 to a few
KiB): a larger buffer is filled only that far, so one notification costs bounded
time whatever the guest posts.
"""

import os
from dataclasses import dataclass, field
from typing import ClassVar

from kvmkit.devices.irq import IrqLine
from kvmkit.devices.virtio.mmio import VirtioMmioDevice, VirtioState
from kvmkit.devices.virtio.queue import GuestRam
from kvmkit.records import bounds

VIRTIO_ID_RNG = 4
QUEUE_SIZE = 64
MAX_REQUEST_BYTES = 64 << 10


@dataclass(frozen=True)
class RngConfig:
    """virtio-rng has nothing to configure."""


@dataclass(frozen=True)
class RngState:
    transport: VirtioState
    bytes_given: int = field(default=0, metadata=bounds(0, None))


class VirtioRng(VirtioMmioDevice):
    kind: ClassVar[str] = "virtio-rng"
    device_id: ClassVar[int] = VIRTIO_ID_RNG
    queue_sizes: ClassVar[tuple[int, ...]] = (QUEUE_SIZE,)
    state_version: ClassVar[int] = 1
    state_type: ClassVar[type] = RngState

    def __init__(
        self, name: str, ram: GuestRam, irq: IrqLine, state: RngState | None = None
    ) -> None:
        super().__init__(name, ram, irq, 0, state.transport if state else None)
        self.config = RngConfig()
        self.bytes_given = state.bytes_given if state else 0

    def summary(self) -> str:
        return f"virtio-rng: {self.bytes_given} bytes given"

    def save_state(self) -> RngState:
        return RngState(self.transport_state(), self.bytes_given)

    def device_queue(self, index: int) -> None:
        q = self.queues[index]
        pushed = False
        while (chain := q.pop(self.ram)) is not None:
            want = min(chain.writable_bytes, MAX_REQUEST_BYTES)
            written = q.write_chain(self.ram, chain, os.getrandom(want)) if want else 0
            self.bytes_given += written
            q.push(self.ram, chain.head, written)
            pushed = True
        if pushed:
            self.signal_used(index)
