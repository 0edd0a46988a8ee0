"""The split virtqueue walker against a bytearray guest RAM: chains, indirect tables,
EVENT_IDX, and every hostile shape a driver can give (each a QueueError, bounded)."""

import struct

import pytest

from kvmkit.devices.virtio.queue import (
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    QueueError,
    QueueState,
    Virtqueue,
)
from kvmkit.errors import KvmkitError

RAM = 1 << 20
DESC, AVAIL, USED = 0x1000, 0x2000, 0x3000
SIZE = 8


class Ram:
    def __init__(self) -> None:
        self.data = bytearray(RAM)
        self.dirtied: list[tuple[int, int]] = []

    def view(self, gpa: int, length: int) -> memoryview:
        if gpa < 0 or length < 0 or gpa + length > RAM:
            raise KvmkitError(f"{gpa:#x}+{length:#x} is not guest RAM")
        return memoryview(self.data)[gpa : gpa + length]

    def mark_dirty(self, gpa: int, length: int) -> None:
        self.dirtied.append((gpa, length))

    def desc(
        self, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0, table: int = DESC
    ) -> None:
        struct.pack_into("<QIHH", self.data, table + 16 * i, addr, length, flags, nxt)

    def offer(self, *heads: int) -> None:
        idx = struct.unpack_from("<H", self.data, AVAIL + 2)[0]
        for h in heads:
            struct.pack_into("<H", self.data, AVAIL + 4 + 2 * (idx % SIZE), h)
            idx = (idx + 1) & 0xFFFF
        struct.pack_into("<H", self.data, AVAIL + 2, idx)


def queue(size: int = SIZE, **kw: int) -> Virtqueue:
    q = Virtqueue("q", 256, QueueState(size=size, ready=True, desc=DESC, avail=AVAIL, used=USED))
    for k, v in kw.items():
        setattr(q, k, v)
    return q


def test_a_chain_is_split_into_readable_then_writable_and_returned_through_used() -> None:
    ram, q = Ram(), queue()
    q.check(ram)
    ram.desc(0, 0x10000, 16, VIRTQ_DESC_F_NEXT, 5)
    ram.desc(5, 0x20000, 512, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 2)
    ram.desc(2, 0x30000, 1, VIRTQ_DESC_F_WRITE)
    ram.data[0x10000:0x10010] = b"0123456789abcdef"
    ram.offer(0)
    chain = q.pop(ram)
    assert chain is not None and chain.head == 0
    assert chain.readable == [(0x10000, 16)] and chain.writable == [(0x20000, 512), (0x30000, 1)]
    assert q.read_chain(ram, chain, 10) == b"0123456789"
    assert q.write_chain(ram, chain, b"x" * 513) == 513 and ram.data[0x30000] == ord("x")
    q.push(ram, chain.head, 513)
    assert struct.unpack_from("<HHII", ram.data, USED) == (0, 1, 0, 513)
    assert {(0x20000, 512), (0x30000, 1), (USED + 4, 8), (USED + 2, 2)} <= set(ram.dirtied)
    assert q.pop(ram) is None
    assert q.should_interrupt(ram)
    struct.pack_into("<H", ram.data, AVAIL, VIRTQ_AVAIL_F_NO_INTERRUPT)
    assert not q.should_interrupt(ram)


def test_indirect_table() -> None:
    ram, q = Ram(), queue(indirect=True)
    ram.desc(0, 0x8000, 3 * 16, VIRTQ_DESC_F_INDIRECT)
    ram.desc(0, 0x10000, 16, VIRTQ_DESC_F_NEXT, 1, table=0x8000)
    ram.desc(1, 0x11000, 8, VIRTQ_DESC_F_NEXT, 2, table=0x8000)
    ram.desc(2, 0x12000, 1, VIRTQ_DESC_F_WRITE, table=0x8000)
    ram.offer(0)
    chain = q.pop(ram)
    assert chain is not None and chain.readable_bytes == 24 and chain.writable == [(0x12000, 1)]


def test_event_idx_interrupts_only_when_the_driver_asked() -> None:
    ram, q = Ram(), queue(event_idx=True)
    for i in range(4):
        ram.desc(i, 0x10000, 1, VIRTQ_DESC_F_WRITE)
    ram.offer(0, 1, 2, 3)
    struct.pack_into("<H", ram.data, AVAIL + 4 + 2 * SIZE, 2)  # used_event: tell me at 3
    for _ in range(2):
        chain = q.pop(ram)
        assert chain is not None
        q.push(ram, chain.head, 1)
    assert q.should_interrupt(ram)  # the first signal is always sent
    chain = q.pop(ram)
    assert chain is not None
    q.push(ram, chain.head, 1)
    assert q.should_interrupt(ram)  # used idx passed 2
    chain = q.pop(ram)
    assert chain is not None
    q.push(ram, chain.head, 1)
    assert not q.should_interrupt(ram)  # used_event still 2
    assert struct.unpack_from("<H", ram.data, USED + 4 + 8 * SIZE)[0] == 4  # avail_event


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda r: r.desc(0, 0x10000, 1, VIRTQ_DESC_F_NEXT, 0), "a loop"),
        (
            lambda r: (
                r.desc(0, 0x10000, 1, VIRTQ_DESC_F_NEXT, 1),
                r.desc(1, 0x10000, 1, VIRTQ_DESC_F_NEXT, 0),
            ),
            "a loop",
        ),
        (lambda r: r.desc(0, 0x10000, 1, VIRTQ_DESC_F_NEXT, 200), "past the queue"),
        (lambda r: r.desc(0, RAM - 4, 8), "not guest RAM"),
        (lambda r: r.desc(0, (1 << 64) - 16, 0x100), "wraps the address space"),
        (lambda r: r.desc(0, 0x10000, 0xFFFF_FFFF), "not guest RAM"),
        (
            lambda r: (
                r.desc(0, 0x10000, 1, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 1),
                r.desc(1, 0x10000, 1),
            ),
            "readable descriptor follows",
        ),
        (lambda r: r.desc(0, USED, 8, VIRTQ_DESC_F_WRITE), "overlaps the queue's rings"),
        (lambda r: r.desc(0, 0x8000, 16, VIRTQ_DESC_F_INDIRECT), "not negotiated"),
    ],
)
def test_hostile_chains_are_queue_errors(setup, message) -> None:  # type: ignore[no-untyped-def]
    ram, q = Ram(), queue()
    setup(ram)
    ram.offer(0)
    with pytest.raises(QueueError, match=message):
        q.pop(ram)


def test_indirect_hostile_shapes() -> None:
    ram, q = Ram(), queue(indirect=True)
    ram.desc(0, 0x8000, 24, VIRTQ_DESC_F_INDIRECT)
    ram.offer(0)
    with pytest.raises(QueueError, match="not 1 to"):
        q.pop(ram)
    ram, q = Ram(), queue(indirect=True)
    ram.desc(0, 0x8000, 32, VIRTQ_DESC_F_INDIRECT)
    ram.desc(0, 0x9000, 32, VIRTQ_DESC_F_INDIRECT, table=0x8000)
    ram.offer(0)
    with pytest.raises(QueueError, match="inside an indirect table"):
        q.pop(ram)
    ram, q = Ram(), queue(indirect=True)  # a loop inside an indirect table of 2
    ram.desc(0, 0x8000, 32, VIRTQ_DESC_F_INDIRECT)
    ram.desc(0, 0x10000, 1, VIRTQ_DESC_F_NEXT, 1, table=0x8000)
    ram.desc(1, 0x10000, 1, VIRTQ_DESC_F_NEXT, 0, table=0x8000)
    ram.offer(0)
    with pytest.raises(QueueError, match="a loop"):
        q.pop(ram)


def test_available_index_running_too_far_ahead() -> None:
    ram, q = Ram(), queue()
    struct.pack_into("<H", ram.data, AVAIL + 2, SIZE + 1)
    with pytest.raises(QueueError, match="ahead"):
        q.pop(ram)


@pytest.mark.parametrize(
    ("size", "desc", "message"),
    [
        (3, DESC, "not a power of two"),
        (0, DESC, "not a power of two"),
        (512, DESC, "not a power of two from 1 to 256"),
        (SIZE, DESC + 8, "not 16-byte aligned"),
        (SIZE, RAM - 16, "not guest RAM"),
        (SIZE, AVAIL - 16, "overlaps"),
    ],
)
def test_bad_rings_are_refused(size: int, desc: int, message: str) -> None:
    q = queue(size=size, desc=desc)
    with pytest.raises(QueueError, match=message):
        q.check(Ram())


def test_state_round_trips() -> None:
    ram, q = Ram(), queue(event_idx=True)
    ram.desc(0, 0x10000, 1, VIRTQ_DESC_F_WRITE)
    ram.offer(0)
    chain = q.pop(ram)
    assert chain is not None
    q.push(ram, 0, 1)
    q2 = Virtqueue("q", 256, q.save())
    assert q2.save() == q.save() and q2.last_avail == 1 and q2.used_idx == 1
