"""Receive buffers taken from a virtqueue but not used: given back to the driver.

A device that must know a chain's size before it can fill it (a frame that needs
several buffers, a vsock packet read from a host socket that turned out empty) pops
chains first; those it does not use go back by moving the device's available index
back (the driver still owns them: nothing was written to the used ring). With
VIRTIO_F_EVENT_IDX the avail_event the pop published moves back too, so the driver
notifies again when it adds buffers after them.
"""

from kvmkit.devices.virtio.queue import GuestRam, Virtqueue, mark_dirty


def give_back(q: Virtqueue, ram: GuestRam, count: int) -> None:
    """Undo the last `count` pops of `q`."""
    if not count:
        return
    q.last_avail = (q.last_avail - count) & 0xFFFF
    if q.event_idx:
        at = q.used + 4 + 8 * q.size
        ram.view(at, 2)[:] = q.last_avail.to_bytes(2, "little")
        mark_dirty(ram, at, 2)  # a device write outside a pushed chain: for live migration
