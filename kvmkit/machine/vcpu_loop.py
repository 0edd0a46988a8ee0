"""The per-vCPU thread: KVM_RUN, dispatch the exit, repeat. This is the hot path."""

import ctypes
import errno
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING

from kvmkit import faults, libc
from kvmkit.arch.x86.registers import format_registers
from kvmkit.devices.bus import Bus, Mapping
from kvmkit.kvm import KvmError, Vcpu
from kvmkit.machine.result import EXIT_GUEST_CRASH, EXIT_HOST_ERROR, EXIT_OK
from kvmkit.uapi import ioctls
from kvmkit.uapi.exits import ExitReason as X
from kvmkit.uapi.exits import InternalErrorSuberror, SystemEventType

if TYPE_CHECKING:
    from kvmkit.machine.machine import Machine

_IO = struct.Struct("<BBHIQ")  # kvm_run.io: direction, size, port, count, data_offset
_MMIO = struct.Struct("<Q8sIB")  # kvm_run.mmio: phys_addr, data, len, is_write
_EXIT_UNION = 32
_NR_REASONS = 64


def _lookup(bus: Bus, cache: dict[int, Mapping], addr: int, size: int) -> Mapping | None:
    """The miss path of the per-vCPU address cache: ask the bus, remember a hit."""
    m = bus.find(addr, size)
    if m is not None:
        cache[addr] = m
    return m


def run_vcpu(machine: "Machine", vcpu: Vcpu, counts: list[int]) -> None:
    """Run `vcpu` until the machine stops or this vCPU halts. Never raises: every
    failure stops the machine with a reason."""
    try:
        _loop(machine, vcpu, counts)
    except KvmError as e:
        machine.stop(EXIT_HOST_ERROR, f"vCPU {vcpu.index}: {e}")
    except OSError as e:  # a device's backing file, or an injected device fault
        name = errno.errorcode.get(e.errno or 0, str(e.errno))
        machine.stop(
            EXIT_HOST_ERROR, f"vCPU {vcpu.index}: {e.filename or 'device'}: {e.strerror} ({name})"
        )
    except Exception as e:  # a device or kvmkit bug: report it, never hang the machine
        machine.stop(EXIT_HOST_ERROR, f"vCPU {vcpu.index}: internal error: {type(e).__name__}: {e}")
    finally:
        machine.gate.gone(vcpu.index)


def _faulty(raw: Callable[..., int], vcpu: Vcpu) -> Callable[..., int]:
    """KVM_RUN through the active fault plan (chosen once per loop, so a run without a
    plan pays nothing): a planned errno fails the call as the kernel would; a planned
    guest event is delivered to the vCPU just before it enters."""

    def run(fd: int, request: ctypes.c_ulong, arg: ctypes.c_ulong) -> int:
        rule = faults.planned_rule("ioctl:KVM_RUN")
        if rule is not None:
            if rule.event is not None:
                faults.deliver(vcpu, rule.event)
            elif err := faults.errno_after_delay(rule):
                ctypes.set_errno(err)
                return -1
        return raw(fd, request, arg)

    return run


def _device_fault(mapping: Mapping, addr: int) -> None:
    """The device.io hook: a planned failure of the device at `addr` (a port or MMIO
    address) stops the machine with the device named."""
    try:
        faults.inject("device.io")
    except OSError as e:
        raise OSError(e.errno, e.strerror, f"device {mapping.device.name} at {addr:#x}") from None


def _loop(machine: "Machine", vcpu: Vcpu, counts: list[int]) -> None:
    checked = faults.active() is not None
    ioctl = _faulty(libc.raw_ioctl, vcpu) if checked else libc.raw_ioctl
    fd = vcpu.fd
    request = ctypes.c_ulong(ioctls.KVM_RUN)
    zero = ctypes.c_ulong(0)
    run = vcpu.run_struct
    page = vcpu.run_page
    stopping = machine.stopping.is_set
    attention = machine.attention.is_set
    pio, pio_cache = machine.pio_bus, dict[int, Mapping]()
    mmio, mmio_cache = machine.mmio_bus, dict[int, Mapping]()
    unpack_io = _IO.unpack_from
    from_bytes = int.from_bytes
    IO, MMIO, HLT, INTR = int(X.IO), int(X.MMIO), int(X.HLT), int(X.INTR)  # ints: faster ==
    RING_FULL = int(X.DIRTY_RING_FULL)

    while not stopping():
        if ioctl(fd, request, zero) < 0:
            err = ctypes.get_errno()
            if err == errno.EINTR or err == errno.EAGAIN:
                counts[INTR] += 1
                # A kick: KVM has completed any pending exit, so the vCPU is settled.
                if attention() and not machine.gate.park(vcpu):
                    return
                continue
            raise KvmError("KVM_RUN", err)
        reason = run.exit_reason
        counts[reason if reason < _NR_REASONS else 0] += 1

        if reason == IO:
            out, size, port, count, offset = unpack_io(page, _EXIT_UNION)
            m = pio_cache.get(port)
            if m is None or port + size > m.end:
                m = _lookup(pio, pio_cache, port, size)
            if m is None:
                _unclaimed(machine, vcpu, "port", port, size, out, page, offset)
                return
            if checked:
                _device_fault(m, port)
            dev, rel = m.device, port - m.base
            if out:
                if count == 1 and size == 1:
                    dev.write(rel, 1, page[offset])
                else:
                    for i in range(count):
                        at = offset + i * size
                        dev.write(rel, size, from_bytes(page[at : at + size], "little"))
            else:
                for i in range(count):
                    at = offset + i * size
                    page[at : at + size] = (dev.read(rel, size) & ((1 << (8 * size)) - 1)).to_bytes(
                        size, "little"
                    )
        elif reason == MMIO:
            addr, data, length, is_write = _MMIO.unpack_from(page, _EXIT_UNION)
            m = mmio_cache.get(addr)
            if m is None or addr + length > m.end:
                m = _lookup(mmio, mmio_cache, addr, length)
            if m is None:
                _unclaimed(machine, vcpu, "MMIO address", addr, length, is_write, page, 40)
                return
            if checked:
                _device_fault(m, addr)
            if is_write:
                m.device.write(addr - m.base, length, from_bytes(data[:length], "little"))
            else:
                value = m.device.read(addr - m.base, length) & ((1 << (8 * length)) - 1)
                page[40 : 40 + length] = value.to_bytes(length, "little")
        elif reason == HLT:
            machine.vcpu_halted(vcpu.index)
            return
        elif reason == INTR:
            continue
        elif reason == RING_FULL and machine.dirty_rings is not None:
            machine.dirty_rings.harvest_full(vcpu.index)  # KVM re-enters once the ring has room
        else:
            _stop_on_exit(machine, vcpu, reason)
            return


def _registers(vcpu: Vcpu) -> str:
    try:
        return format_registers(vcpu.get_regs(), vcpu.get_sregs())
    except KvmError as e:
        return f"  (registers unavailable: {e})"


def _unclaimed(
    machine: "Machine",
    vcpu: Vcpu,
    what: str,
    addr: int,
    size: int,
    is_write: int,
    page: memoryview,
    data_at: int,
) -> None:
    if is_write:
        value = int.from_bytes(page[data_at : data_at + size], "little")
        access = f"wrote {value:#x} ({size} byte{'s' if size > 1 else ''}) to"
    else:
        access = f"read {size} byte{'s' if size > 1 else ''} from"
    machine.stop(
        EXIT_GUEST_CRASH,
        f"vCPU {vcpu.index} {access} {what} {addr:#x}, which no device claims",
        _registers(vcpu),
    )


def _stop_on_exit(machine: "Machine", vcpu: Vcpu, reason: int) -> None:
    run = vcpu.run_struct
    name = X.name_of(reason)
    if reason == X.SHUTDOWN:
        machine.stop(
            EXIT_GUEST_CRASH,
            f"vCPU {vcpu.index}: guest shut down (KVM_EXIT_SHUTDOWN: triple fault)",
            _registers(vcpu),
        )
    elif reason == X.INTERNAL_ERROR:
        internal = run.exit.internal
        try:
            sub = InternalErrorSuberror(internal.suberror).name
        except ValueError:
            sub = str(internal.suberror)
        data = " ".join(f"{internal.data[i]:#x}" for i in range(min(internal.ndata, 16)))
        machine.stop(
            EXIT_GUEST_CRASH,
            f"vCPU {vcpu.index}: KVM internal error, suberror {sub}"
            + (f", data {data}" if data else ""),
            _registers(vcpu),
        )
    elif reason == X.FAIL_ENTRY:
        fail = run.exit.fail_entry
        machine.stop(
            EXIT_GUEST_CRASH,
            f"vCPU {vcpu.index}: VM entry failed, hardware reason"
            f" {fail.hardware_entry_failure_reason:#x}",
            _registers(vcpu),
        )
    elif reason == X.SYSTEM_EVENT:
        event = run.exit.system_event.type
        if event == SystemEventType.SHUTDOWN:
            machine.stop(EXIT_OK, f"vCPU {vcpu.index}: guest powered off")
        elif event == SystemEventType.RESET:
            machine.stop(EXIT_OK, f"vCPU {vcpu.index}: guest asked for a reset; stopped instead")
        else:
            try:
                label = SystemEventType(event).name
            except ValueError:
                label = str(event)
            machine.stop(
                EXIT_GUEST_CRASH, f"vCPU {vcpu.index}: system event {label}", _registers(vcpu)
            )
    else:
        machine.stop(
            EXIT_GUEST_CRASH,
            f"vCPU {vcpu.index}: unhandled exit reason {name} ({reason})",
            _registers(vcpu),
        )
