"""The exits test bench: what a guest's port and MMIO accesses, HLT and a triple fault
look like to the VMM (the kvm_run fields KVM fills), and how kvmkit ends a run on a
debug-exit write and on an access no device claims. Each check runs a few
instructions of real guest code built from assembly.
"""

import tempfile

from kvmkit.hostcheck.probes import run_with_timeout
from kvmkit.testing.checks import Check
from kvmkit.testing.harness import build_asm, built_machine, run_guest
from kvmkit.uapi.exits import ExitReason

# Addresses no device claims: a port, and an MMIO address below 1 GiB (inside the
# identity map) but above the 16 MiB of RAM these checks give the guest.
FREE_PORT = 0x3000
FREE_MMIO = 0x30000000
MEMORY = "16M"


def _first_exit(source: str, fill_in: int | None = None) -> tuple[int, object]:
    """Run `source` to its first exit (answering an IN or an MMIO read with `fill_in`
    and running on to the second exit); the exit reason and kvm_run's exit union."""
    with tempfile.TemporaryDirectory(prefix="kvmkit-exits-") as tmp:
        image = build_asm(source, tmp)
        with built_machine(image, memory=MEMORY, irqchip=False) as machine:
            vcpu = machine.vcpus[0]
            reason = run_with_timeout(vcpu)
            run = vcpu.run_struct
            if fill_in is not None and reason == ExitReason.IO:
                vcpu.run_page[run.exit.io.data_offset] = fill_in
                reason = run_with_timeout(vcpu)
            elif fill_in is not None and reason == ExitReason.MMIO:
                run.exit.mmio.data[0] = fill_in
                reason = run_with_timeout(vcpu)
            union = run.exit.io if reason == ExitReason.IO else run.exit.mmio
            copy = type(union).from_buffer_copy(bytes(union))  # outlives the machine
            return reason, copy


def _name(reason: int) -> str:
    return ExitReason.name_of(reason)


def port_write() -> str:
    reason, io = _first_exit(f"mov dx, {FREE_PORT:#x}\nmov ax, 0xabcd\nout dx, ax\nhlt\n")
    if reason != ExitReason.IO:
        return _name(reason)
    return f"out port {io.port:#x} size {io.size} count {io.count}"  # type: ignore[attr-defined]


def port_read() -> str:
    """The value the VMM puts in the data page is what the guest's IN reads."""
    source = f"mov dx, {FREE_PORT:#x}\nin al, dx\nmov dx, {FREE_PORT + 1:#x}\nout dx, al\nhlt\n"
    with tempfile.TemporaryDirectory(prefix="kvmkit-exits-") as tmp:
        with built_machine(build_asm(source, tmp), memory=MEMORY, irqchip=False) as machine:
            vcpu = machine.vcpus[0]
            if run_with_timeout(vcpu) != ExitReason.IO:
                return "no IO exit"
            vcpu.run_page[vcpu.run_struct.exit.io.data_offset] = 0x5A
            if run_with_timeout(vcpu) != ExitReason.IO:
                return "no second IO exit"
            io = vcpu.run_struct.exit.io
            return f"guest wrote {vcpu.run_page[io.data_offset]:#x} to {io.port:#x}"


def string_port_write() -> str:
    """KVM's emulator sends REP OUTS one element per exit (it batches only INS)."""
    source = f"""mov dx, {FREE_PORT:#x}
lea rsi, [rip + 1f]
mov ecx, 5
rep outsb
hlt
1: .ascii "kvmkt"
"""
    with tempfile.TemporaryDirectory(prefix="kvmkit-exits-") as tmp:
        with built_machine(build_asm(source, tmp), memory=MEMORY, irqchip=False) as machine:
            vcpu = machine.vcpus[0]
            data, exits = bytearray(), 0
            while (reason := run_with_timeout(vcpu)) == ExitReason.IO and exits < 16:
                io = vcpu.run_struct.exit.io
                exits += 1
                data += vcpu.run_page[io.data_offset : io.data_offset + io.size * io.count]
            return f"{data.decode(errors='replace')!r} in {exits} exits, then {_name(reason)}"


def mmio_write() -> str:
    reason, mmio = _first_exit(
        f"mov rbx, {FREE_MMIO:#x}\nmov eax, 0x11223344\nmov [rbx], eax\nhlt\n"
    )
    if reason != ExitReason.MMIO:
        return _name(reason)
    value = int.from_bytes(bytes(mmio.data)[: mmio.len], "little")  # type: ignore[attr-defined]
    return f"write {mmio.phys_addr:#x} len {mmio.len} data {value:#x}"  # type: ignore[attr-defined]


def mmio_read() -> str:
    source = f"mov rbx, {FREE_MMIO:#x}\nmov al, [rbx]\nmov dx, {FREE_PORT:#x}\nout dx, al\nhlt\n"
    with tempfile.TemporaryDirectory(prefix="kvmkit-exits-") as tmp:
        with built_machine(build_asm(source, tmp), memory=MEMORY, irqchip=False) as machine:
            vcpu = machine.vcpus[0]
            run = vcpu.run_struct
            if run_with_timeout(vcpu) != ExitReason.MMIO or run.exit.mmio.is_write:
                return "no MMIO read exit"
            run.exit.mmio.data[0] = 0xC3
            if run_with_timeout(vcpu) != ExitReason.IO:
                return "no IO exit after the read"
            return f"guest read {vcpu.run_page[run.exit.io.data_offset]:#x}"


def halt() -> str:
    return _name(_first_exit("hlt\n")[0])


def triple_fault() -> str:
    """No usable IDT and an exception: a shutdown, reported as KVM_EXIT_SHUTDOWN."""
    return _name(_first_exit("lidt [rip + 1f]\nud2\n1: .quad 0, 0\n")[0])


def debug_exit_status() -> str:
    with tempfile.TemporaryDirectory(prefix="kvmkit-exits-") as tmp:
        image = build_asm("mov edi, 7\njmp exit\n", tmp)
        run = run_guest(image, memory=MEMORY, timeout_s=10)
    return f"status {run.status}"


def unclaimed_port() -> str:
    with tempfile.TemporaryDirectory(prefix="kvmkit-exits-") as tmp:
        image = build_asm(f"mov dx, {FREE_PORT:#x}\nout dx, al\nhlt\n", tmp)
        run = run_guest(image, memory=MEMORY, timeout_s=10)
    claimed = "which no device claims" in run.reason
    return f"status {run.status}" + (", port named" if claimed and "0x3000" in run.reason else "")


CHECKS: list[Check] = [
    Check("pio.write", "OUT: port, size and count", "out port 0x3000 size 2 count 1", port_write),
    Check(
        "pio.read",
        "IN reads what the VMM put in the data page",
        "guest wrote 0x5a to 0x3001",
        port_read,
    ),
    Check(
        "pio.string",
        "REP OUTSB of 5 bytes: one exit per byte, in order",
        "'kvmkt' in 5 exits, then HLT",
        string_port_write,
    ),
    Check(
        "mmio.write",
        "a store outside RAM: address, length, data",
        "write 0x30000000 len 4 data 0x11223344",
        mmio_write,
    ),
    Check(
        "mmio.read", "a load outside RAM reads what the VMM answers", "guest read 0xc3", mmio_read
    ),
    Check("hlt", "HLT with no in-kernel irqchip exits to the VMM", "HLT", halt),
    Check("shutdown", "an undeliverable exception shuts the guest down", "SHUTDOWN", triple_fault),
    Check(
        "debug_exit",
        "a write to port 0x501 ends the run with that status",
        "status 7",
        debug_exit_status,
    ),
    Check(
        "unclaimed",
        "an access no device claims stops the run as a guest crash, port named",
        "status 3, port named",
        unclaimed_port,
    ),
]
