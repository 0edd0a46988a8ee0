"""A vCPU's exits, decoded from its `kvm_run` page into small typed values.

Every offset here is taken from the ctypes mirror of `struct kvm_run` (uapi/run.py),
never written by hand, and each `struct.Struct` used on the hot path is checked
against that mirror when this module loads. `ExitDecoder` reads one vCPU's page;
a unit test writes exits into a bytearray shaped like `kvm_run`
(kvmkit/testing/exits.py) and lets the vCPU loop read them through the same decoder.

The hot path (port and MMIO exits) reads raw field tuples from prebound `unpack_from`
calls (`io_fields`, `mmio_fields`): a NamedTuple per exit cost half a microsecond,
more than the rest of the dispatch. `io()` and `mmio()` give the typed values for
messages and tests.
"""

import ctypes
import functools
import struct
from collections.abc import Callable
from typing import NamedTuple

from kvmkit.uapi.exits import KVM_EXIT_IO_OUT, ExitReason
from kvmkit.uapi.run import kvm_run, kvm_run_io, kvm_run_mmio

EXIT_UNION = kvm_run.exit.offset
IF_FLAG = kvm_run.if_flag.offset
EXIT_REASON = kvm_run.exit_reason.offset
EXIT_REASON_WORD = EXIT_REASON // 4  # its index in the page seen as u32 words
IO_AT = EXIT_UNION
MMIO_AT = EXIT_UNION
MMIO_DATA_AT = EXIT_UNION + kvm_run_mmio.data.offset

# Exit reasons as plain ints (an int compare is faster than an IntEnum one).
IO = int(ExitReason.IO)
MMIO = int(ExitReason.MMIO)
HLT = int(ExitReason.HLT)
INTR = int(ExitReason.INTR)
SHUTDOWN = int(ExitReason.SHUTDOWN)
FAIL_ENTRY = int(ExitReason.FAIL_ENTRY)
INTERNAL_ERROR = int(ExitReason.INTERNAL_ERROR)
SYSTEM_EVENT = int(ExitReason.SYSTEM_EVENT)
DIRTY_RING_FULL = int(ExitReason.DIRTY_RING_FULL)
NR_REASONS = 64  # the counters' size; reasons at or above it count as reason 0


def struct_for(cls: type[ctypes.Structure], codes: list[str]) -> struct.Struct:
    """A little-endian Struct reading `cls`'s fields in order, one `struct` code per
    field; raises if any offset or size differs from the ctypes mirror's."""
    at = 0
    for (name, *_), code in zip(cls._fields_, codes, strict=True):
        field = getattr(cls, name)
        size = struct.calcsize("<" + code)
        if field.offset != at or field.size != size:
            raise AssertionError(f"{cls.__name__}.{name}: struct code {code!r} does not match")
        at += size
    return struct.Struct("<" + "".join(codes))


# kvm_run.io: direction, size, port, count, data_offset
IO_STRUCT = struct_for(kvm_run_io, ["B", "B", "H", "I", "Q"])
# kvm_run.mmio: phys_addr, data, len, is_write
MMIO_STRUCT = struct_for(kvm_run_mmio, ["Q", "8s", "I", "B"])


class IoExit(NamedTuple):
    """KVM_EXIT_IO: `accesses` (kvm_run's count) of `size` bytes to `port`; the data
    (written by the guest for OUT, to be filled for IN) is at `data_offset` in the
    kvm_run page."""

    out: bool
    size: int
    port: int
    accesses: int
    data_offset: int


class MmioExit(NamedTuple):
    """KVM_EXIT_MMIO: one access of `length` bytes at `addr`; `data` holds what the
    guest wrote (for a read, the VMM fills it with `ExitDecoder.complete_mmio_read`)."""

    addr: int
    data: bytes
    length: int
    is_write: bool


class InternalError(NamedTuple):
    """KVM_EXIT_INTERNAL_ERROR: the suberror and the data words KVM gave."""

    suberror: int
    data: tuple[int, ...]


class SystemEvent(NamedTuple):
    """KVM_EXIT_SYSTEM_EVENT: its type (KVM_SYSTEM_EVENT_*) and data words."""

    type: int
    data: tuple[int, ...]


IoFields = tuple[int, int, int, int, int]  # direction (1 = OUT), size, port, count, data offset
MmioFields = tuple[int, bytes, int, int]  # address, data (8 bytes), length, is_write


class ExitDecoder:
    """Decodes the exit in one vCPU's kvm_run page (a writable memoryview of the whole
    mapping, so PIO data at an exit's data offset is reachable through `page`)."""

    __slots__ = ("page", "_run", "io_fields", "mmio_fields")

    def __init__(self, page: memoryview) -> None:
        self.page = page
        self._run = kvm_run.from_buffer(page)
        bind = functools.partial
        self.io_fields: Callable[[], IoFields] = bind(IO_STRUCT.unpack_from, page, IO_AT)
        self.mmio_fields: Callable[[], MmioFields] = bind(MMIO_STRUCT.unpack_from, page, MMIO_AT)

    def io(self) -> IoExit:
        out, size, port, count, offset = self.io_fields()
        return IoExit(out == KVM_EXIT_IO_OUT, size, port, count, offset)

    def io_value(self, at: int, size: int) -> int:
        """The value the guest wrote in an OUT access whose data is at `at` (an exit's
        data offset plus the access index times its size)."""
        if size == 1:
            return self.page[at]
        return int.from_bytes(self.page[at : at + size], "little")

    def complete_io_in(self, at: int, size: int, value: int) -> None:
        """Give the IN access whose data is at `at` its value (truncated to `size`)."""
        self.page[at : at + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def mmio(self) -> MmioExit:
        addr, data, length, is_write = self.mmio_fields()
        return MmioExit(addr, data[: min(length, 8)], length, bool(is_write))

    def complete_mmio_read(self, length: int, value: int) -> None:
        """Give the MMIO read of `length` bytes its value (truncated to it)."""
        n = min(length, 8)
        self.page[MMIO_DATA_AT : MMIO_DATA_AT + n] = (value & ((1 << (8 * n)) - 1)).to_bytes(
            n, "little"
        )

    def if_flag(self) -> bool:
        """RFLAGS.IF as KVM reported it on the last return from KVM_RUN."""
        return bool(self.page[IF_FLAG])

    def internal_error(self) -> InternalError:
        internal = self._run.exit.internal
        n = min(internal.ndata, len(internal.data))
        return InternalError(internal.suberror, tuple(internal.data[:n]))

    def system_event(self) -> SystemEvent:
        event = self._run.exit.system_event
        n = min(event.ndata, len(event.data))
        return SystemEvent(event.type, tuple(event.data[:n]))

    def fail_entry_reason(self) -> int:
        return int(self._run.exit.fail_entry.hardware_entry_failure_reason)
