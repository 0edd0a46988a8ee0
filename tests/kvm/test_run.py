"""Whole machines: built-in guests, both backends, vCPU counts, guest<->host memory,
crashes, and clean teardown."""

import io
import struct

import pytest

from kvmkit.guests.abi import PORT_DEBUG_EXIT
from kvmkit.guests.build import BUILTIN
from kvmkit.machine import MachineConfig, build_for_boot
from kvmkit.machine.result import EXIT_GUEST_CRASH
from kvmkit.memory import GuestMemoryError

from .conftest import open_fds, write_guest

PATTERN = 0x5A5AA5A5C3C33C3C
BACKENDS = ["guest_memfd", "memfd"]
EXPECTED_CONSOLE = {
    "hello": b"hello: bye\n",
    "memtest": b"memtest: all 1 vCPUs passed\n",
    "hello16": b"hello from real mode\n",
    "exitloop": b"",
    "touch": b"",
    "counter": b"cpu0 n=10 sum=0xe11826c763805db8\n",
    "trap": b"trap: handlers ready\ntrap: 0 event(s)\n",
    "dirtier": b"dirtier: done after 10 rounds\n",
    "echo": b"ok q\necho: 4 byte(s)\n",
}
INPUT = {"echo": b"ok q"}  # console input, waiting before the guest starts
# --guest-arg per guest: 10 steps, events or exits; the dirtier: 10 rounds of 10 pages.
GUEST_ARG = {"dirtier": (10 << 48) | 10}


def run_machine(config: MachineConfig, console_input: bytes = b""):
    console = io.BytesIO()
    with build_for_boot(config, console=console) as m:
        m.serial.feed(console_input)
        result = m.run()
    return result, console.getvalue()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("guest", list(BUILTIN))
def test_builtin_guest_exits_zero(guest, backend):
    result, console = run_machine(
        MachineConfig(
            guest=guest,
            memory_backend=backend,
            memory_bytes=32 << 20,
            guest_arg=GUEST_ARG.get(guest, 10),
        ),
        INPUT.get(guest, b""),
    )
    assert result.status == 0, (result.reason, result.detail, console)
    assert result.backend == backend
    assert console.endswith(EXPECTED_CONSOLE[guest])


def test_default_run_is_hello_on_guest_memfd():
    result, console = run_machine(MachineConfig(memory_bytes=64 << 20))
    assert console.startswith(b"hello from kvmkit: 64 MiB, 1 vCPU(s)\n")
    assert result.status == 0 and result.reason == "guest exited with status 0"
    assert result.backend == "guest_memfd" and result.backend_reason == "default"
    assert result.exits["IO"] == result.console_bytes + 1  # one exit per byte, plus the exit port


@pytest.mark.parametrize("vcpus, irqchip", [(1, True), (2, True), (4, True), (2, False)])
def test_memtest_on_n_vcpus(vcpus, irqchip):
    result, console = run_machine(
        MachineConfig(guest="memtest", vcpus=vcpus, memory_bytes=64 << 20, irqchip=irqchip)
    )
    assert result.status == 0, (result.reason, console)
    lines = console.decode().splitlines()
    for i in range(vcpus):
        assert any(line.startswith(f"memtest: vCPU {i}: ok, ") for line in lines), console
    assert lines[-1] == f"memtest: all {vcpus} vCPUs passed"
    # every vCPU but the last to finish halted; the last wrote the exit port (with the
    # in-kernel LAPIC a HLT waits in KVM instead of exiting)
    assert result.exits.get("HLT", 0) == (0 if irqchip else vcpus - 1)


def test_hello_on_two_vcpus_halts_the_second():
    result, console = run_machine(MachineConfig(vcpus=2, memory_bytes=32 << 20))
    assert result.status == 0 and b"2 vCPU(s)" in console


@pytest.mark.parametrize("backend", BACKENDS)
def test_guest_writes_are_visible_to_the_host(backend):
    with build_for_boot(
        MachineConfig(memory_bytes=32 << 20, memory_backend=backend, console="none")
    ) as m:
        assert m.run().status == 0
        start, end = m.plan.free_ranges[1]
        for gpa in (start, (start + end) // 2 & ~0xFFF, end - 4096):
            (word,) = struct.unpack("<Q", m.memory.read(gpa, 8))
            assert word == gpa ^ PATTERN


@pytest.mark.parametrize("backend", BACKENDS)
def test_host_writes_are_visible_to_the_guest(tmp_path, backend):
    mailbox = 0x800000
    config = MachineConfig(
        guest=write_guest(tmp_path, "peek"),
        memory_bytes=32 << 20,
        memory_backend=backend,
        guest_arg=mailbox,
    )
    console = io.BytesIO()
    with build_for_boot(config, console=console) as m:
        m.memory.write(mailbox, struct.pack("<Q", 0x1122334455667788))
        # the zero-copy view sees the same bytes
        assert bytes(m.memory.view(mailbox, 8)) == struct.pack("<Q", 0x1122334455667788)
        result = m.run()
        assert struct.unpack("<Q", m.memory.read(mailbox + 8, 8))[0] == 0xFEEDFACE0000
    assert result.status == 0
    assert console.getvalue() == b"peek: 0x1122334455667788\n"


def test_out_of_range_access_is_a_clear_error():
    with build_for_boot(MachineConfig(memory_bytes=16 << 20, console="none")) as m:
        with pytest.raises(GuestMemoryError, match="not inside guest RAM"):
            m.memory.read((16 << 20) - 4, 8)
        with pytest.raises(GuestMemoryError):
            m.memory.write(-8, b"x")


def test_guest_status_is_passed_through(tmp_path):
    result, _ = run_machine(
        MachineConfig(guest=write_guest(tmp_path, "status"), memory_bytes=16 << 20, guest_arg=42)
    )
    assert result.status == 42 and result.reason == "guest exited with status 42"


def test_triple_fault_stops_with_registers_and_closes_fds(tmp_path):
    guest = write_guest(tmp_path, "triple_fault")
    before = open_fds()
    result, _ = run_machine(MachineConfig(guest=guest, memory_bytes=16 << 20))
    assert open_fds() == before
    assert result.status == EXIT_GUEST_CRASH
    assert "triple fault" in result.reason
    assert "rip=" in result.detail and "cr0=" in result.detail


def test_unknown_port_stops_with_a_clear_message_and_closes_fds(tmp_path):
    guest = write_guest(tmp_path, "bad_port")
    before = open_fds()
    result, _ = run_machine(MachineConfig(guest=guest, memory_bytes=16 << 20, vcpus=2))
    assert open_fds() == before
    assert result.status == EXIT_GUEST_CRASH
    assert "wrote 0x5a (1 byte) to port 0x1234, which no device claims" in result.reason
    assert "rip=" in result.detail


def test_successful_run_closes_every_fd():
    before = open_fds()
    result, _ = run_machine(MachineConfig(guest="memtest", vcpus=2, memory_bytes=16 << 20))
    assert result.status == 0
    assert open_fds() == before


def test_a_machine_runs_once():
    with build_for_boot(
        MachineConfig(guest="exitloop", memory_bytes=16 << 20, console="none")
    ) as m:
        m.run()
        with pytest.raises(RuntimeError, match="runs once"):
            m.run()


def test_debug_exit_port_is_on_the_bus():
    with build_for_boot(MachineConfig(memory_bytes=16 << 20, console="none")) as m:
        assert m.pio_bus.find(PORT_DEBUG_EXIT, 4).device.name == "debug-exit"
