"""Scripted exits for unit tests of exit handling: `ExitWriter` writes exits into a
buffer shaped like `kvm_run`, as KVM would, so the vCPU loop reads them through the
real `ExitDecoder` with no KVM underneath."""

from kvmkit.kvm.exits import (
    FAIL_ENTRY,
    INTERNAL_ERROR,
    IO,
    IO_AT,
    IO_STRUCT,
    MMIO,
    MMIO_AT,
    MMIO_DATA_AT,
    MMIO_STRUCT,
    SYSTEM_EVENT,
)
from kvmkit.uapi.run import kvm_run


class ExitWriter:
    """Writes exits into a kvm_run-shaped buffer as KVM would: what a unit test uses to
    feed the vCPU loop scripted exits through the real `ExitDecoder`. PIO data goes at
    `DATA_AT` (KVM puts it in the page after kvm_run)."""

    DATA_AT = 4096

    def __init__(self, page: memoryview) -> None:
        self.page = page
        self._run = kvm_run.from_buffer(page)

    def reason(self, reason: int) -> None:
        self._run.exit_reason = reason

    def io(self, out: bool, size: int, port: int, values: list[int], count: int = 0) -> None:
        """A port exit: `values` written by an OUT (one per access); for an IN, `count`
        accesses whose data the VMM fills."""
        n = len(values) if out else count
        IO_STRUCT.pack_into(self.page, IO_AT, int(out), size, port, n, self.DATA_AT)
        for i, v in enumerate(values):
            at = self.DATA_AT + i * size
            self.page[at : at + size] = v.to_bytes(size, "little")
        self.reason(IO)

    def io_data(self, size: int, count: int) -> list[int]:
        """The values the VMM put in the PIO data page for an IN exit."""
        at = self.DATA_AT
        return [
            int.from_bytes(self.page[at + i * size : at + (i + 1) * size], "little")
            for i in range(count)
        ]

    def mmio(self, addr: int, length: int, is_write: bool, value: int = 0) -> None:
        data = value.to_bytes(8, "little")
        MMIO_STRUCT.pack_into(self.page, MMIO_AT, addr, data, length, int(is_write))
        self.reason(MMIO)

    def mmio_data(self) -> int:
        """The value the VMM gave the last MMIO read (all 8 data bytes)."""
        return int.from_bytes(self.page[MMIO_DATA_AT : MMIO_DATA_AT + 8], "little")

    def internal_error(self, suberror: int, data: tuple[int, ...]) -> None:
        internal = self._run.exit.internal
        internal.suberror, internal.ndata = suberror, len(data)
        for i, d in enumerate(data):
            internal.data[i] = d
        self.reason(INTERNAL_ERROR)

    def system_event(self, type_: int, data: tuple[int, ...] = ()) -> None:
        event = self._run.exit.system_event
        event.type, event.ndata = type_, len(data)
        for i, d in enumerate(data):
            event.data[i] = d
        self.reason(SYSTEM_EVENT)

    def fail_entry(self, hardware_reason: int) -> None:
        self._run.exit.fail_entry.hardware_entry_failure_reason = hardware_reason
        self.reason(FAIL_ENTRY)
