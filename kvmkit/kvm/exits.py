"""A vCPU's exits, decoded from its `kvm_run` page into small typed values.

Every offset here is taken from the ctypes mirror of `struct kvm_run` (uapi/run.py),
never written by hand, and each `struct.Struct` used on the hot path is checked
against that mirror when this module loads. `ExitDecoder` reads one vCPU's page;
a test can feed the vCPU loop fake exits by giving it any object with the same
methods (see `ExitView`).
"""

import ctypes
import struct
from typing import NamedTuple, Protocol

from kvmkit.uapi.exits import KVM_EXIT_IO_OUT, ExitReason
from kvmkit.uapi.run import kvm_run, kvm_run_io, kvm_run_mmio

EXIT_UNION = kvm_run.exit.offset
IF_FLAG = kvm_run.if_flag.offset
EXIT_REASON = kvm_run.exit_reason.offset
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


_new_tuple = tuple.__new__
_IO = struct_for(kvm_run_io, ["B", "B", "H", "I", "Q"])  # direction, size, port, count, offset
_MMIO = struct_for(kvm_run_mmio, ["Q", "8s", "I", "B"])  # phys_addr, data, len, is_write


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


class ExitView(Protocol):
    """What the vCPU loop reads of an exit (ExitDecoder, or a test's fake)."""

    def io(self) -> IoExit: ...
    def io_value(self, exit: IoExit, i: int) -> int: ...
    def complete_io_in(self, exit: IoExit, i: int, value: int) -> None: ...
    def mmio(self) -> MmioExit: ...
    def complete_mmio_read(self, exit: MmioExit, value: int) -> None: ...
    def if_flag(self) -> bool: ...
    def internal_error(self) -> InternalError: ...
    def system_event(self) -> SystemEvent: ...
    def fail_entry_reason(self) -> int: ...


class ExitDecoder:
    """Decodes the exit in one vCPU's kvm_run page (a writable memoryview of the whole
    mapping, so PIO data at `data_offset` is reachable)."""

    __slots__ = ("page", "_run", "_unpack_io", "_unpack_mmio")

    def __init__(self, page: memoryview) -> None:
        self.page = page
        self._run = kvm_run.from_buffer(page)
        self._unpack_io = _IO.unpack_from
        self._unpack_mmio = _MMIO.unpack_from

    def io(self) -> IoExit:
        out, size, port, count, offset = self._unpack_io(self.page, IO_AT)
        # tuple.__new__ skips the NamedTuple's Python-level __new__ (half the cost)
        return _new_tuple(IoExit, (out == KVM_EXIT_IO_OUT, size, port, count, offset))

    def io_value(self, exit: IoExit, i: int) -> int:
        """The value the guest wrote in access `i` of an OUT exit."""
        size = exit.size
        at = exit.data_offset + i * size
        if size == 1:
            return self.page[at]
        return int.from_bytes(self.page[at : at + size], "little")

    def complete_io_in(self, exit: IoExit, i: int, value: int) -> None:
        """Give access `i` of an IN exit its value (truncated to the access size)."""
        at = exit.data_offset + i * exit.size
        size = exit.size
        self.page[at : at + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def mmio(self) -> MmioExit:
        addr, data, length, is_write = self._unpack_mmio(self.page, MMIO_AT)
        return MmioExit(addr, data[: min(length, 8)], length, bool(is_write))

    def complete_mmio_read(self, exit: MmioExit, value: int) -> None:
        n = min(exit.length, 8)
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
