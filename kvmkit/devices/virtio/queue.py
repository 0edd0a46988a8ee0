"""The split virtqueue (virtio 1.2, 2.7): descriptor table, available and used rings.

A `Virtqueue` is the device's side of one queue. The driver hands it buffers as
descriptor chains; `pop()` returns the next chain as a `Chain` (its readable and
writable guest ranges, in order), `push(chain, written)` returns it through the used
ring, and `should_interrupt()` says whether the driver asked to be told (the avail
ring's NO_INTERRUPT flag, or the used_event index with VIRTIO_F_EVENT_IDX).

Guests are untrusted. Everything read from guest memory is checked before use, and
every walk is bounded by the queue size, so no guest input costs more memory or time
than a queue of that size can ask for honestly:

- queue sizes must be powers of two from 1 to the device's maximum; the rings must be
  aligned, inside guest RAM and must not overlap one another;
- a chain longer than the queue size (a descriptor loop), an index past the table, a
  buffer outside guest RAM, a length that wraps the address space, a device-writable
  buffer before a readable one, a nested indirect table or one that is not a whole
  number of descriptors, a writable buffer over the rings, an available index that
  runs more than a queue size ahead: each is a `QueueError`. The transport then sets
  DEVICE_NEEDS_RESET and ignores the queue until the driver resets the device.

Guest memory is reached through `GuestRam` (kvmkit.memory.GuestMemory provides it; the
unit tests use a bytearray).
"""

import struct
from dataclasses import dataclass, field
from typing import Protocol

from kvmkit.errors import KvmkitError
from kvmkit.records import U16, U64, bounds

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1

DESC_SIZE = 16
MAX_QUEUE_SIZE = 32768  # the split ring's limit (virtio 1.2, 2.7)
MAX_CHAIN_BYTES = 1 << 32  # a chain's buffers together: more is a QueueError


class QueueError(KvmkitError):
    """The driver broke the virtqueue rules; the message names the queue and what."""


class GuestRam(Protocol):
    def view(self, gpa: int, length: int) -> memoryview:
        """A writable view of guest RAM [gpa, gpa+length); raises KvmkitError when any
        of it is not guest RAM (or not reachable from the host)."""
        ...


def mark_dirty(ram: GuestRam, gpa: int, length: int) -> None:
    """Tell `ram` the device wrote [gpa, gpa+length), so a migration sends it again
    (GuestMemory.mark_dirty: KVM's dirty log does not see the VMM's writes). A RAM
    without `mark_dirty` (a unit test's bytearray) records nothing."""
    record = getattr(ram, "mark_dirty", None)
    if record is not None:
        record(gpa, length)


@dataclass(frozen=True)
class QueueState:
    """One queue's registers and indices, as saved in a snapshot."""

    size: int = field(default=0, metadata=bounds(0, MAX_QUEUE_SIZE))
    ready: bool = False
    desc: int = field(default=0, metadata=bounds(*U64))
    avail: int = field(default=0, metadata=bounds(*U64))
    used: int = field(default=0, metadata=bounds(*U64))
    last_avail: int = field(default=0, metadata=bounds(*U16))
    used_idx: int = field(default=0, metadata=bounds(*U16))
    signalled_used: int = field(default=0, metadata=bounds(*U16))
    signalled_valid: bool = False


@dataclass
class Chain:
    """One descriptor chain: `head` (the id returned in the used ring), the readable
    (driver-to-device) and writable (device-to-driver) guest ranges, in order."""

    head: int
    readable: list[tuple[int, int]] = field(default_factory=list)
    writable: list[tuple[int, int]] = field(default_factory=list)

    @property
    def readable_bytes(self) -> int:
        return sum(n for _, n in self.readable)

    @property
    def writable_bytes(self) -> int:
        return sum(n for _, n in self.writable)


def _overlaps(a: int, alen: int, b: int, blen: int) -> bool:
    return a < b + blen and b < a + alen


class Virtqueue:
    """The device side of one split virtqueue. `max_size`: QueueNumMax."""

    def __init__(self, name: str, max_size: int, state: QueueState | None = None) -> None:
        if not 1 <= max_size <= MAX_QUEUE_SIZE or max_size & (max_size - 1):
            raise ValueError(f"{name}: queue size maximum {max_size} is not a power of two")
        self.name = name
        self.max_size = max_size
        self.event_idx = False  # VIRTIO_F_EVENT_IDX negotiated
        self._writable: dict[int, list[tuple[int, int]]] = {}  # head -> buffers, until push
        self.indirect = False  # VIRTIO_F_INDIRECT_DESC negotiated
        self.load(state or QueueState(size=max_size))

    # -- registers and state ------------------------------------------------------------
    def load(self, s: QueueState) -> None:
        self.size = s.size
        self.ready = s.ready
        self.desc, self.avail, self.used = s.desc, s.avail, s.used
        self.last_avail = s.last_avail
        self.used_idx = s.used_idx
        self.signalled_used = s.signalled_used
        self.signalled_valid = s.signalled_valid

    def save(self) -> QueueState:
        return QueueState(
            self.size,
            self.ready,
            self.desc,
            self.avail,
            self.used,
            self.last_avail,
            self.used_idx,
            self.signalled_used,
            self.signalled_valid,
        )

    def reset(self) -> None:
        self.load(QueueState(size=self.max_size))
        self._writable.clear()

    # -- checks ---------------------------------------------------------------------------
    def check(self, ram: GuestRam) -> None:
        """Raise QueueError unless the queue's size and rings are usable."""
        n = self.size
        if not 1 <= n <= self.max_size or n & (n - 1):
            raise QueueError(
                f"{self.name}: queue size {n} is not a power of two from 1 to {self.max_size}"
            )
        rings = (
            ("descriptor table", self.desc, DESC_SIZE * n, 16),
            ("available ring", self.avail, 6 + 2 * n, 2),
            ("used ring", self.used, 6 + 8 * n, 4),
        )
        for what, gpa, length, align in rings:
            if gpa % align:
                raise QueueError(f"{self.name}: {what} at {gpa:#x} is not {align}-byte aligned")
            self._view(ram, gpa, length, what)
        for i, (what_a, a, alen, _) in enumerate(rings):
            for what_b, b, blen, _ in rings[i + 1 :]:
                if _overlaps(a, alen, b, blen):
                    raise QueueError(f"{self.name}: the {what_a} overlaps the {what_b}")

    def _view(self, ram: GuestRam, gpa: int, length: int, what: str) -> memoryview:
        if gpa + length > 1 << 64:
            raise QueueError(f"{self.name}: {what} {gpa:#x}+{length:#x} wraps the address space")
        try:
            return ram.view(gpa, length)
        except KvmkitError as e:
            raise QueueError(f"{self.name}: {what} {gpa:#x}+{length:#x}: {e}") from None

    def _over_rings(self, gpa: int, length: int) -> bool:
        n = self.size
        return (
            _overlaps(gpa, length, self.desc, DESC_SIZE * n)
            or _overlaps(gpa, length, self.avail, 6 + 2 * n)
            or _overlaps(gpa, length, self.used, 6 + 8 * n)
        )

    # -- the available ring -------------------------------------------------------------
    def avail_idx(self, ram: GuestRam) -> int:
        view = self._view(ram, self.avail + 2, 2, "available index")
        return int.from_bytes(view, "little")

    def pending(self, ram: GuestRam) -> int:
        """How many chains the driver has made available and the device not yet taken."""
        ahead = (self.avail_idx(ram) - self.last_avail) & 0xFFFF
        if ahead > self.size:
            raise QueueError(
                f"{self.name}: the available index runs {ahead} entries ahead of the device,"
                f" more than the queue's {self.size}"
            )
        return ahead

    def pop(self, ram: GuestRam) -> Chain | None:
        """The next available chain, or None when there is none."""
        if not self.pending(ram):
            return None
        slot = self.last_avail % self.size
        head = int.from_bytes(self._view(ram, self.avail + 4 + 2 * slot, 2, "avail ring"), "little")
        chain = self._walk(ram, head)
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        if chain.writable:  # marked dirty when the chain is returned (head < size)
            self._writable[head] = chain.writable
        if self.event_idx:  # avail_event: notify me when you pass what I have taken
            at = self.used + 4 + 8 * self.size
            self._view(ram, at, 2, "avail_event")[:] = self.last_avail.to_bytes(2, "little")
            mark_dirty(ram, at, 2)
        return chain

    def _walk(self, ram: GuestRam, head: int) -> Chain:
        chain = Chain(head)
        table, count, index = self.desc, self.size, head
        in_indirect = False
        seen = 0
        total = 0
        while True:
            if index >= count:
                raise QueueError(
                    f"{self.name}: descriptor index {index} is past the "
                    f"{'indirect table' if in_indirect else 'queue'} ({count} entries)"
                )
            seen += 1
            if seen > count:
                raise QueueError(
                    f"{self.name}: descriptor chain from {head} is longer than its table of"
                    f" {count}: a loop"
                )
            raw = self._view(ram, table + DESC_SIZE * index, DESC_SIZE, "descriptor")
            addr, length, flags, nxt = struct.unpack("<QIHH", raw)
            if flags & VIRTQ_DESC_F_INDIRECT:
                if in_indirect or not self.indirect:
                    why = "inside an indirect table" if in_indirect else "not negotiated"
                    raise QueueError(f"{self.name}: indirect descriptor {why}")
                if flags & VIRTQ_DESC_F_NEXT or chain.readable or chain.writable:
                    raise QueueError(
                        f"{self.name}: an indirect descriptor must be the chain's only one"
                    )
                if length == 0 or length % DESC_SIZE or length // DESC_SIZE > MAX_QUEUE_SIZE:
                    raise QueueError(
                        f"{self.name}: indirect table of {length} bytes is not 1 to"
                        f" {MAX_QUEUE_SIZE} descriptors"
                    )
                self._view(ram, addr, length, "indirect table")
                table, count, index = addr, length // DESC_SIZE, 0
                in_indirect, seen = True, 0
                continue
            if addr + length > 1 << 64:
                raise QueueError(
                    f"{self.name}: buffer {addr:#x}+{length:#x} wraps the address space"
                )
            if length:
                self._view(ram, addr, length, "buffer")
            total += length
            if total > MAX_CHAIN_BYTES:
                raise QueueError(f"{self.name}: chain from {head} is larger than 4 GiB")
            if flags & VIRTQ_DESC_F_WRITE:
                if self._over_rings(addr, length):
                    raise QueueError(
                        f"{self.name}: device-writable buffer {addr:#x}+{length:#x} overlaps"
                        " the queue's rings"
                    )
                chain.writable.append((addr, length))
            elif chain.writable:
                raise QueueError(
                    f"{self.name}: a readable descriptor follows a writable one in the chain"
                    f" from {head}"
                )
            else:
                chain.readable.append((addr, length))
            if not flags & VIRTQ_DESC_F_NEXT:
                return chain
            index = nxt

    # -- the used ring --------------------------------------------------------------------
    def push(self, ram: GuestRam, head: int, written: int) -> None:
        """Return chain `head` to the driver, `written` bytes written into it."""
        slot = self.used_idx % self.size
        elem = self._view(ram, self.used + 4 + 8 * slot, 8, "used ring")
        elem[:] = struct.pack("<II", head, written & 0xFFFF_FFFF)
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        self._view(ram, self.used + 2, 2, "used index")[:] = self.used_idx.to_bytes(2, "little")
        mark_dirty(ram, self.used + 4 + 8 * slot, 8)
        mark_dirty(ram, self.used + 2, 2)
        for gpa, length in self._writable.pop(head, ()):  # what the device may have written
            mark_dirty(ram, gpa, length)

    def should_interrupt(self, ram: GuestRam) -> bool:
        """Whether the driver wants an interrupt for the chains pushed since the last
        one it was sent (called after a batch of `push`es)."""
        new = self.used_idx
        if self.event_idx:
            old, valid = self.signalled_used, self.signalled_valid
            self.signalled_used, self.signalled_valid = new, True
            if not valid:
                return True
            at = self.avail + 4 + 2 * self.size
            event = int.from_bytes(self._view(ram, at, 2, "used_event"), "little")
            return (new - event - 1) & 0xFFFF < (new - old) & 0xFFFF
        flags = int.from_bytes(self._view(ram, self.avail, 2, "available flags"), "little")
        return not flags & VIRTQ_AVAIL_F_NO_INTERRUPT

    # -- reading and writing a chain's buffers ------------------------------------------
    def read_chain(self, ram: GuestRam, chain: Chain, limit: int) -> bytes:
        """The chain's readable bytes, at most `limit` of them."""
        out = bytearray()
        for gpa, length in chain.readable:
            take = min(length, limit - len(out))
            if take <= 0:
                break
            out += self._view(ram, gpa, take, "buffer")
        return bytes(out)

    def write_chain(self, ram: GuestRam, chain: Chain, data: bytes, skip: int = 0) -> int:
        """Write `data` into the chain's writable buffers from byte `skip`; returns how
        many bytes were written (less than len(data) when the buffers are shorter)."""
        done = 0
        for gpa, length in chain.writable:
            if skip >= length:
                skip -= length
                continue
            take = min(length - skip, len(data) - done)
            if take <= 0:
                break
            self._view(ram, gpa + skip, take, "buffer")[:] = data[done : done + take]
            done += take
            skip = 0
        return done
