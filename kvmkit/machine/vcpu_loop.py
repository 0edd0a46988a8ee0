"""The per-vCPU loop: KVM_RUN, dispatch the exit from a table, repeat. The hot path.

The loop knows nothing of KVM beyond `VcpuPort`: a prebound runner returning exit
reasons and the decoder of that vCPU's exits (kvmkit/kvm/exits.py). A machine builds
one from a real vCPU; a unit test from exits it writes into a kvm_run-shaped buffer
(kvmkit/testing/exits.py).

Every microsecond here is paid per exit, so the loop does no more than it must: the
dispatch table is a list indexed by reason, port and MMIO exits are read as raw field
tuples, and the machine's stop is not polled: a stop kicks every vCPU (immediate_exit),
so it arrives as an INTR exit, which `on_kick` answers.
"""

import errno
from collections.abc import Callable
from dataclasses import dataclass, field

from kvmkit import faults
from kvmkit.devices.bus import Bus, Device
from kvmkit.kvm import KvmError
from kvmkit.kvm.exits import (
    DIRTY_RING_FULL,
    FAIL_ENTRY,
    HLT,
    INTERNAL_ERROR,
    INTR,
    IO,
    MMIO,
    NR_REASONS,
    SHUTDOWN,
    SYSTEM_EVENT,
    ExitDecoder,
    IoExit,
    MmioExit,
)
from kvmkit.machine.result import EXIT_GUEST_CRASH, EXIT_HOST_ERROR, EXIT_OK
from kvmkit.uapi.exits import ExitReason, InternalErrorSuberror, SystemEventType

Handler = Callable[[], bool]  # handles the current exit; False ends this vCPU's loop
Hit = tuple[int, int, Device]  # a cached bus mapping: base, end, device
StopFn = Callable[[int, str, str], None]


@dataclass
class VcpuPort:
    """One vCPU as the loop sees it, and what the machine does on its behalf."""

    index: int
    run: Callable[[], int]  # KVM_RUN; returns the exit reason (INTR for a kick)
    exits: ExitDecoder
    pio: Bus
    mmio: Bus
    stopping: Callable[[], bool]  # checked before the first KVM_RUN
    stop: StopFn  # (status, reason, detail): ends the machine and kicks every vCPU
    on_kick: Handler  # KVM_RUN was interrupted (pause, stop, halt check)
    on_hlt: Handler  # a HLT exit (only without an in-kernel LAPIC)
    describe: Callable[[], str] = lambda: ""  # the registers, for crash reports
    on_ring_full: Callable[[], None] | None = None
    on_shutdown: Handler | None = None  # a triple fault (else: a guest crash)
    device_faults: bool = False  # consult the fault plan's device.io site per access
    ignore_unclaimed: bool = False  # an access no device claims: ignore it (reads get ~0)
    unclaimed: int = 0  # how many were ignored
    counts: list[int] = field(default_factory=lambda: [0] * NR_REASONS)


def run_vcpu(port: VcpuPort) -> None:
    """Run until the machine stops or this vCPU is done. Never raises: every failure
    stops the machine with a reason."""
    who = f"vCPU {port.index}"
    try:
        _loop(port)
    except KvmError as e:
        port.stop(EXIT_HOST_ERROR, f"{who}: {e}", "")
    except OSError as e:  # a device's backing file, or an injected device fault
        name = errno.errorcode.get(e.errno or 0, str(e.errno))
        where = e.filename or "device"
        port.stop(EXIT_HOST_ERROR, f"{who}: {where}: {e.strerror} ({name})", "")
    except Exception as e:  # a device or kvmkit bug: report it, never hang the machine
        port.stop(EXIT_HOST_ERROR, f"{who}: internal error: {type(e).__name__}: {e}", "")


def handlers(port: VcpuPort) -> list[Handler | None]:
    """The dispatch table: exit reason -> handler of the current exit (None: the exit
    ends the machine)."""
    exits, pio, mmio = port.exits, port.pio, port.mmio
    pio_cache: dict[int, Hit] = {}
    mmio_cache: dict[int, Hit] = {}
    checked = port.device_faults
    io_fields, mmio_fields, data = exits.io_fields, exits.mmio_fields, exits.page
    io_value, complete_io_in = exits.io_value, exits.complete_io_in
    complete_mmio_read = exits.complete_mmio_read

    def on_io() -> bool:
        out, size, where, count, at = io_fields()
        hit = pio_cache.get(where)
        if hit is None or where + size > hit[1]:
            hit = _lookup(pio, pio_cache, where, size)
            if hit is None:
                return _unclaimed_io(port, exits.io())
        base, _, dev = hit
        if checked:
            _device_fault(dev, where)
        rel = where - base
        if out:
            if count == 1 and size == 1:  # the common case: one byte
                dev.write(rel, 1, data[at])
            else:
                for i in range(count):
                    dev.write(rel, size, io_value(at + i * size, size))
        else:
            for i in range(count):
                complete_io_in(at + i * size, size, dev.read(rel, size))
        return True

    def on_mmio() -> bool:
        addr, raw, length, is_write = mmio_fields()
        hit = mmio_cache.get(addr)
        if hit is None or addr + length > hit[1]:
            hit = _lookup(mmio, mmio_cache, addr, length)
            if hit is None:
                return _unclaimed_mmio(port, exits.mmio())
        base, _, dev = hit
        if checked:
            _device_fault(dev, addr)
        if is_write:
            dev.write(addr - base, length, int.from_bytes(raw[:length], "little"))
        else:
            complete_mmio_read(length, dev.read(addr - base, length))
        return True

    table: list[Handler | None] = [None] * NR_REASONS
    table[IO], table[MMIO], table[INTR], table[HLT] = on_io, on_mmio, port.on_kick, port.on_hlt
    if port.on_shutdown is not None:
        table[SHUTDOWN] = port.on_shutdown
    if port.on_ring_full is not None:
        harvest = port.on_ring_full

        def on_ring_full() -> bool:
            harvest()  # KVM re-enters once the ring has room
            return True

        table[DIRTY_RING_FULL] = on_ring_full
    return table


def _loop(port: VcpuPort) -> None:
    table = handlers(port)
    run, counts = port.run, port.counts
    if port.stopping():
        return
    while True:
        reason = run()
        if reason < NR_REASONS:
            counts[reason] += 1
            handler = table[reason]
        else:  # past the table: counted as 0, and it ends the machine
            counts[0] += 1
            handler = None
        if handler is None:
            status, why = ending_exit(port.exits, reason)
            port.stop(
                status, f"vCPU {port.index}: {why}", "" if status == EXIT_OK else port.describe()
            )
            return
        if not handler():
            return


def ending_exit(exits: ExitDecoder, reason: int) -> tuple[int, str]:
    """The run status and reason for an exit that ends the machine."""
    if reason == SHUTDOWN:
        return EXIT_GUEST_CRASH, "guest shut down (KVM_EXIT_SHUTDOWN: triple fault)"
    if reason == INTERNAL_ERROR:
        err = exits.internal_error()
        try:
            sub = InternalErrorSuberror(err.suberror).name
        except ValueError:
            sub = str(err.suberror)
        data = " ".join(f"{d:#x}" for d in err.data)
        return EXIT_GUEST_CRASH, f"KVM internal error, suberror {sub}" + (
            f", data {data}" if data else ""
        )
    if reason == FAIL_ENTRY:
        return (
            EXIT_GUEST_CRASH,
            f"VM entry failed, hardware reason {exits.fail_entry_reason():#x}",
        )
    if reason == SYSTEM_EVENT:
        event = exits.system_event().type
        if event == SystemEventType.SHUTDOWN:
            return EXIT_OK, "guest powered off"
        if event == SystemEventType.RESET:
            return EXIT_OK, "guest asked for a reset; stopped instead"
        try:
            label = SystemEventType(event).name
        except ValueError:
            label = str(event)
        return EXIT_GUEST_CRASH, f"system event {label}"
    return EXIT_GUEST_CRASH, f"unhandled exit reason {ExitReason.name_of(reason)} ({reason})"


def _lookup(bus: Bus, cache: dict[int, Hit], addr: int, size: int) -> Hit | None:
    """The miss path of the per-vCPU address cache: ask the bus, remember a hit."""
    m = bus.find(addr, size)
    if m is None:
        return None
    hit = cache[addr] = (m.base, m.end, m.device)
    return hit


def _device_fault(device: Device, addr: int) -> None:
    """The device.io hook: a planned failure of the device at `addr` (a port or MMIO
    address) stops the machine with the device named."""
    try:
        faults.inject("device.io")
    except OSError as e:
        raise OSError(e.errno, e.strerror, f"device {device.name} at {addr:#x}") from None


def _access(is_write: bool, size: int, value: int) -> str:
    plural = "s" if size > 1 else ""
    if is_write:
        return f"wrote {value:#x} ({size} byte{plural}) to"
    return f"read {size} byte{plural} from"


def _unclaimed_io(port: VcpuPort, e: IoExit) -> bool:
    if port.ignore_unclaimed:
        port.unclaimed += 1
        if not e.out:
            for i in range(e.accesses):
                port.exits.complete_io_in(e.data_offset + i * e.size, e.size, -1)
        return True
    value = port.exits.io_value(e.data_offset, e.size) if e.out else 0
    port.stop(
        EXIT_GUEST_CRASH,
        f"vCPU {port.index} {_access(e.out, e.size, value)} port {e.port:#x},"
        " which no device claims",
        port.describe(),
    )
    return False


def _unclaimed_mmio(port: VcpuPort, e: MmioExit) -> bool:
    if port.ignore_unclaimed:
        port.unclaimed += 1
        if not e.is_write:
            port.exits.complete_mmio_read(e.length, -1)
        return True
    value = int.from_bytes(e.data, "little")
    port.stop(
        EXIT_GUEST_CRASH,
        f"vCPU {port.index} {_access(e.is_write, e.length, value)} MMIO address {e.addr:#x},"
        " which no device claims",
        port.describe(),
    )
    return False
