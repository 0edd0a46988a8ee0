"""How a running machine handles each kind of exit: MMIO reaches the device that claims
the address (values going both ways), and every way a guest or a device can go wrong
stops the run with a reason a person can act on, never a hang: unclaimed MMIO, code
run from outside RAM (a KVM internal error), an exit kvmkit does not handle, a device
that raises."""

from kvmkit.guests.abi import PORT_POST
from kvmkit.machine.result import EXIT_GUEST_CRASH, EXIT_HOST_ERROR

MMIO_BASE = 0x20000000  # above a 64 MiB guest's RAM, inside its identity map
UNCLAIMED = 0x30000000


class Registers:
    """An MMIO device with eight 8-byte registers that remembers every write."""

    name = "registers"
    state_version = 1

    def __init__(self) -> None:
        self.values = [0x1122334455667788 + i for i in range(8)]
        self.writes: list[tuple[int, int, int]] = []

    def read(self, offset: int, size: int) -> int:
        return self.values[offset // 8] >> (8 * (offset % 8))

    def write(self, offset: int, size: int, value: int) -> None:
        self.writes.append((offset, size, value))
        self.values[offset // 8] = value

    def save_state(self) -> dict[str, object]:
        return {"values": self.values}

    def load_state(self, state: dict[str, object]) -> None:
        self.values = list(state["values"])  # type: ignore[call-overload]


MMIO_GUEST = f"""
    mov rbx, {MMIO_BASE:#x}
    mov ecx, 3
1:  mov dword ptr [rbx + 8], 0xcafe0000   /* a 4-byte store, three times */
    add dword ptr [rbx + 8], ecx           /* read-modify-write: a load then a store */
    dec ecx
    jnz 1b
    mov rax, [rbx + 16]                    /* an 8-byte load */
    mov dx, {PORT_POST}
    out dx, al                             /* its low byte, to the POST port */
    mov al, [rbx + 17]                     /* a 1-byte load at an offset */
    out dx, al
    mov edi, 0
    jmp exit
"""


def test_mmio_loads_and_stores_reach_the_device(guest_asm, vm_factory):
    machine = vm_factory(guest_asm(MMIO_GUEST), memory="64M")
    device = Registers()
    machine.mmio_bus.add(MMIO_BASE, 64, device)
    result = machine.run()
    assert result.status == 0, result.reason
    assert device.writes[0] == (8, 4, 0xCAFE0000)
    assert (8, 4, 0xCAFE0003) in device.writes and device.values[1] == 0xCAFE0001
    assert machine.post.writes == 2 and machine.post.last == 0x77  # byte 1 of register 2
    assert result.exits["MMIO"] >= 10


def test_a_failing_mmio_device_stops_the_run_naming_it(guest_asm, vm_factory, fault_plan):
    fault_plan("device.io:EIO@nth=2")
    machine = vm_factory(guest_asm(MMIO_GUEST), memory="64M")
    machine.mmio_bus.add(MMIO_BASE, 64, Registers())
    result = machine.run()
    assert result.status == EXIT_HOST_ERROR
    assert (
        result.reason == f"vCPU 0: device registers at {MMIO_BASE + 8:#x}: Input/output error (EIO)"
    )


def test_an_unclaimed_mmio_store_crashes_naming_address_and_value(guest_asm, vm_factory):
    guest = guest_asm(f"mov rbx, {UNCLAIMED:#x}\n mov word ptr [rbx], 0xbeef\n jmp park\n")
    result = vm_factory(guest, memory="64M").run()
    assert result.status == EXIT_GUEST_CRASH
    assert result.reason == (
        f"vCPU 0 wrote 0xbeef (2 bytes) to MMIO address {UNCLAIMED:#x}, which no device claims"
    )
    assert "rip=" in result.detail  # the registers are printed


def test_an_unclaimed_mmio_load_crashes_naming_address_and_size(guest_asm, vm_factory):
    guest = guest_asm(f"mov rbx, {UNCLAIMED:#x}\n mov rax, [rbx]\n jmp park\n")
    result = vm_factory(guest, memory="64M").run()
    assert result.status == EXIT_GUEST_CRASH
    assert result.reason == (
        f"vCPU 0 read 8 bytes from MMIO address {UNCLAIMED:#x}, which no device claims"
    )


def test_code_run_from_outside_ram_is_a_kvm_internal_error(guest_asm, vm_factory):
    result = vm_factory(guest_asm(f"mov rax, {UNCLAIMED:#x}\n jmp rax\n"), memory="64M").run()
    assert result.status == EXIT_GUEST_CRASH
    assert result.reason.startswith("vCPU 0: KVM internal error, suberror EMULATION")
    assert "rip=" in result.detail


def test_an_exit_kvmkit_does_not_handle_is_reported_with_the_registers(guest_asm, vm_factory):
    machine = vm_factory(guest_asm("nop\n jmp park\n"), memory="64M")
    machine.vcpus[0].set_guest_debug(0x1 | 0x2)  # KVM_GUESTDBG_ENABLE | SINGLESTEP
    result = machine.run()
    assert result.status == EXIT_GUEST_CRASH
    assert result.reason == "vCPU 0: unhandled exit reason DEBUG (4)"
    assert "rip=" in result.detail


class Broken(Registers):
    name = "broken"

    def read(self, offset: int, size: int) -> int:
        raise ZeroDivisionError("the device model divided by zero")


def test_a_device_bug_stops_the_machine_instead_of_hanging_it(guest_asm, vm_factory):
    machine = vm_factory(guest_asm(MMIO_GUEST), memory="64M")
    machine.mmio_bus.add(MMIO_BASE, 64, Broken())
    result = machine.run()
    assert result.status == EXIT_HOST_ERROR
    assert result.reason == (
        "vCPU 0: internal error: ZeroDivisionError: the device model divided by zero"
    )
