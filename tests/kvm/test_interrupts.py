"""Interrupts and the event loop, with real guests on the in-kernel irqchip (the
default): the UART's IRQ 4 reaches a guest's handler through the PIC, input is paced
to the guest without loss, a guest halted with interrupts on waits for them, one
halted with them off ends the run, and an ioeventfd doorbell is served by the event
loop without an exit to kvmkit."""

import io
import threading
import time

import pytest

from kvmkit.machine import MachineConfig, build_for_boot
from kvmkit.machine.console import ConsoleInput

from .conftest import open_fds


class Running:
    def __init__(self, guest, **kw):
        self.out = io.BytesIO()
        self.machine = build_for_boot(
            MachineConfig(guest=guest, memory_bytes=16 << 20, **kw), console=self.out
        )
        self.results = []
        self.thread = threading.Thread(target=lambda: self.results.append(self.machine.run()))
        self.thread.start()

    def console(self) -> bytes:
        self.machine.console.flush()
        return self.out.getvalue()

    def wait_for(self, text: bytes, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while text not in self.console():
            assert time.monotonic() < deadline, self.console()
            assert self.thread.is_alive(), (self.results, self.console())
            time.sleep(0.02)

    def finish(self, timeout_s: float = 60):
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), self.console()
        self.machine.close()
        return self.results[0]


def test_uart_input_reaches_a_guest_handler_on_irq_4():
    run = Running("echo")
    run.wait_for(b"echo: ready\n")
    time.sleep(0.3)  # halted with interrupts on: it waits, it does not end
    assert run.thread.is_alive() and not run.results
    run.machine.serial.feed(b"interrupts work q")
    result = run.finish()
    assert result.status == 0, result.reason
    assert b"interrupts work q\necho: 17 byte(s)" in run.console()
    assert "HLT" not in result.exits  # the in-kernel LAPIC took the HLTs


def test_console_input_far_larger_than_the_fifo_arrives_whole_and_in_order():
    import os

    run = Running("echo")
    r, w = os.pipe()
    data = bytes(b"0123456789abcdef"[i % 16] for i in range(5000)) + b"q"
    ConsoleInput(r, run.machine.serial, run.machine.events)
    run.wait_for(b"echo: ready\n")
    os.write(w, data)  # 5 KiB into a 16-byte FIFO: paced by the guest's reads
    os.close(w)
    result = run.finish()
    os.close(r)
    assert result.status == 0, result.reason
    out = run.console()
    assert data in out and f"echo: {len(data)} byte(s)".encode() in out


HALT = "mov al, '.'\nmov dx, PORT_COM1\nout dx, al\ncli\nhlt\njmp park\n"


def test_a_guest_halting_with_interrupts_off_ends_the_run(guest_asm):
    run = Running(str(guest_asm(HALT)), vcpus=2)  # vCPU 1 halts as well (both run it)
    result = run.finish()
    assert (result.status, result.reason) == (0, "all vCPUs halted")
    assert run.console() == b".."


def test_an_ioeventfd_doorbell_is_served_by_the_event_loop_without_exits(guest_asm):
    doorbell = 0x30000000  # not RAM, inside the guest's identity map
    guest = guest_asm(
        f"""
    mov rcx, 200
    mov rbx, {doorbell:#x}
1:  mov dword ptr [rbx], 1
    dec rcx
    jnz 1b
    xor edi, edi
    jmp exit
"""
    )
    before = open_fds()
    with build_for_boot(
        MachineConfig(guest=str(guest), memory_bytes=16 << 20, console="none")
    ) as m:
        rings = []
        m.device_manager.ioeventfd("doorbell", doorbell, 4, lambda: rings.append(1))
        result = m.run()
        deadline = time.monotonic() + 5
        while not rings and time.monotonic() < deadline:
            time.sleep(0.01)
    assert result.status == 0, result.reason
    assert "MMIO" not in result.exits  # KVM completed every write itself
    assert rings  # eventfd counts coalesce: at least one callback
    assert open_fds() == before


def test_no_irqchip_keeps_the_old_contract(guest_asm):
    run = Running(str(guest_asm(HALT)), irqchip=False)
    result = run.finish()
    assert (result.status, result.reason, result.exits.get("HLT")) == (0, "all vCPUs halted", 1)


@pytest.mark.parametrize("irqchip", [True, False])
def test_pause_and_resume_with_the_event_loop_held(irqchip):
    run = Running("counter", vcpus=2, guest_arg=400, irqchip=irqchip)
    run.wait_for(b"n=10 ")
    run.machine.pause()
    assert run.machine.paused and run.machine.status()["paused_by"] == ["user"]
    seen = run.console()
    time.sleep(0.1)
    assert run.console() == seen  # nothing ran while paused
    run.machine.resume()
    result = run.finish()
    assert result.status == 0, result.reason
