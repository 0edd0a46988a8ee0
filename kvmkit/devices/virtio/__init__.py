"""virtio devices on the virtio-mmio transport (virtio 1.2, modern only).

Modules: `mmio.py` (the transport and the base class of every kind), `queue.py` (the
split virtqueue walker, bounded against hostile drivers), one small file per device
kind (`blk.py`, `rng.py`, `balloon.py`; `net.py`, `vsock.py` from the net branch).

How a device kind plugs in
--------------------------
1. Subclass `VirtioMmioDevice` (mmio.py) and set the class attributes:
   `kind` (the saved kind string, "virtio-net"), `device_id` (the virtio device ID:
   1 net, 2 blk, 4 rng, 5 balloon, 19 vsock), `queue_sizes` (QueueNumMax of each
   queue, powers of two), `state_version`, `state_type`.
2. Its constructor takes `(name, ram, irq, <its config>, ..., state=None)` and calls
   `super().__init__(name, ram, irq, features, state.transport if state else None)`:
   `features` are the device-specific feature bits it offers (the transport adds
   VIRTIO_F_VERSION_1, INDIRECT_DESC and EVENT_IDX itself; VERSION_1 is required of
   the driver). `self.driver_features` / `has_feature(bit)` are what was negotiated
   (final once `device_activate()` is called, at DRIVER_OK).
3. Configuration space: override `device_config() -> bytes` (the whole space,
   little-endian; `pack_config` helps) and, if the driver may write it,
   `device_config_write(offset, data)`. A change the device makes itself is followed
   by `config_changed()` (new ConfigGeneration, configuration-change interrupt).
4. Queues: override `device_queue(index)`. It runs on the machine's event loop thread
   (`kvmkit-events`), never a vCPU thread, when the driver writes QueueNotify: KVM
   completes that write through an ioeventfd (one per queue, datamatch = index), so
   the hot path has no exit to Python. It is called under `self.lock` (an RLock shared
   with the register handlers), only while the device is live (DRIVER_OK, no
   NEEDS_RESET). Take chains with `self.queues[index].pop(self.ram)`, read/write their
   buffers with `read_chain` / `write_chain` (or `self.ram.view(gpa, n)` on the
   chain's ranges), return them with `push(self.ram, head, written)`, then call
   `self.signal_used(index)`: it pulses the irqfd line if the driver wants an
   interrupt (EVENT_IDX or NO_INTERRUPT honoured) and sets InterruptStatus bit 0.
   Every guest byte the device writes must be inside a chain it then `push`es (push
   marks the chain's writable buffers and the used ring dirty for live migration,
   whose KVM dirty log misses the VMM's own writes); anything written elsewhere
   (e.g. an avail_event by hand) is reported with `queue.mark_dirty(ram, gpa, n)`.
   A QueueError raised inside `device_queue` (any guest rule broken) sets
   DEVICE_NEEDS_RESET; the device ignores its queues until the driver resets it.
   Work that arrives from the host (a tap or socket fd, a timerfd) is declared by
   overriding `host_readers() -> [(fd, callback)]`: the builder registers each with
   the event loop once the device is placed; callbacks take `self.lock` before
   touching queues (and check `self.active`).
5. `device_activate()` (DRIVER_OK), `device_reset()` (Status written 0: drop what the
   driver set up) and `release()` (close host fds; called when the machine closes) are optional.
6. State: `state_type` is a frozen dataclass decoded with kvmkit.records whose first
   field is `transport: VirtioState` (features, status, queue addresses, sizes and
   indices, config generation, interrupt status), plus the kind's own fields;
   `save_state()` returns `state_type(self.transport_state(), ...)`. It is called with
   the event loop quiesced (between callbacks), so a kind that completes requests
   inside `device_queue` has none in flight.
7. Configuration record: a frozen dataclass (kvmkit.records types only) that is saved
   as the DevicePlacementRecord's `config` and rebuilds the device on restore.
8. Register the kind in `kvmkit/machine/virtio_devices.py` `KINDS`: a `VirtioKind`
   with `configs(resources)` (the boot road: (device id, config) pairs from
   VmResources, e.g. `net0`.. from `resources.nets`) and `make(name, context, irq,
   config, state)` (both roads; `state` is None on boot). The builder then places it
   (a 4 KiB MMIO slot from 0xD0000000 and an irqfd GSI, kept identical on restore),
   registers its doorbells, saves its kind/config/state and adds
   `virtio_mmio.device=4K@0xADDR:GSI` to a Linux guest's command line.

Device ids: `blk0`, `blk1`... (the user's drive id is kept in the config), `rng`,
`balloon`; the net branch uses `net0`..., `vsock`.
"""

from kvmkit.devices.virtio.mmio import VirtioMmioDevice, VirtioState
from kvmkit.devices.virtio.queue import (
    Chain,
    GuestRam,
    QueueError,
    QueueState,
    Virtqueue,
    mark_dirty,
)

__all__ = [
    "Chain",
    "GuestRam",
    "QueueError",
    "QueueState",
    "VirtioMmioDevice",
    "VirtioState",
    "Virtqueue",
    "mark_dirty",
]
