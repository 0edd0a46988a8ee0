"""The 16550A as Linux's 8250 driver sees it: registers, the interrupt line, the
16-byte receive FIFO with overrun, loopback, and console output that never blocks."""

import io
import os
import threading

from kvmkit.devices.console import ConsoleOutput
from kvmkit.devices.irq import LevelRecorder
from kvmkit.devices.serial import (
    FIFO_BYTES,
    IER_RDI,
    IER_RLSI,
    IER_THRI,
    IIR_NO_INT,
    IIR_RDI,
    IIR_RLSI,
    IIR_THRI,
    LCR_DLAB,
    LSR_DR,
    LSR_OE,
    LSR_TEMT,
    LSR_THRE,
    MCR_LOOP,
    PENDING_INPUT_LIMIT,
    Serial16550,
    SerialState,
)
from kvmkit.records import decode, encode
from kvmkit.snapshot.format import StreamFormatError

THR, IER, IIR, LCR, MCR, LSR, MSR, SCR = range(8)


def uart(irq=None):
    out = io.BytesIO()
    console = ConsoleOutput(out)
    return Serial16550(console, irq), console, out


def test_transmit_goes_to_the_console():
    u, console, out = uart()
    for b in b"hi\nx":
        u.write(THR, 1, b)
    assert console.flush()
    assert out.getvalue() == b"hi\nx" and u.transmitted == 4


def test_lsr_always_ready_to_transmit_and_reports_received_data():
    u, _, _ = uart()
    assert u.read(LSR, 1) == LSR_THRE | LSR_TEMT
    u.feed(b"a")
    assert u.read(LSR, 1) & LSR_DR
    assert u.read(THR, 1) == ord("a")
    assert not u.read(LSR, 1) & LSR_DR
    assert u.read(THR, 1) == 0  # empty receiver reads 0


def test_divisor_latch_is_behind_dlab():
    u, console, out = uart()
    u.write(LCR, 1, LCR_DLAB | 0x03)
    u.write(THR, 1, 0x01)
    u.write(IER, 1, 0x00)
    assert u.read(THR, 1) == 0x01 and u.read(IER, 1) == 0x00
    u.write(LCR, 1, 0x03)
    assert u.read(LCR, 1) == 0x03
    console.flush()
    assert out.getvalue() == b""  # divisor writes are not data


def test_scratch_and_msr():
    u, _, _ = uart()
    u.write(SCR, 1, 0x5A)
    assert u.read(SCR, 1) == 0x5A
    assert u.read(MSR, 1) == 0xB0


def test_loopback_echoes_into_the_receiver_and_msr_mirrors_mcr():
    u, console, out = uart()
    u.write(MCR, 1, MCR_LOOP | 0x0A)  # loop, OUT2, RTS: Linux's autoconfig probe
    assert u.read(MSR, 1) & 0xF0 == 0x90  # DCD (OUT2) and CTS (RTS)
    u.write(THR, 1, ord("z"))
    assert u.read(THR, 1) == ord("z")
    console.flush()
    assert out.getvalue() == b""


def test_the_receive_fifo_is_16_bytes_and_an_overrun_sets_lsr_oe():
    line = LevelRecorder(4)
    u, _, _ = uart(line)
    u.write(MCR, 1, MCR_LOOP)
    for i in range(FIFO_BYTES + 5):  # a guest filling its own FIFO in loopback
        u.write(THR, 1, i)
    assert len(u.rx) == FIFO_BYTES
    u.write(IER, 1, IER_RLSI)
    assert u.read(IIR, 1) & 0x0F == IIR_RLSI  # line status outranks everything
    assert u.read(LSR, 1) & LSR_OE
    assert not u.read(LSR, 1) & LSR_OE  # reading LSR cleared it
    assert [u.read(THR, 1) for _ in range(FIFO_BYTES)] == list(range(FIFO_BYTES))


def test_a_guest_looping_forever_cannot_grow_host_memory():
    u, _, _ = uart()
    u.write(MCR, 1, MCR_LOOP)
    for i in range(100_000):
        u.write(THR, 1, i & 0xFF)
    assert len(u.rx) == FIFO_BYTES and len(u.pending) == 0


def test_host_input_waits_for_room_and_is_never_lost():
    u, _, _ = uart()
    data = bytes(range(256)) * 4
    assert u.feed(data) == len(data)
    assert len(u.rx) == FIFO_BYTES  # the rest waits, in order
    got = bytes(u.read(THR, 1) for _ in range(len(data)))
    assert got == data and not u.read(LSR, 1) & LSR_OE


def test_host_input_is_bounded_and_says_how_much_it_took():
    u, _, _ = uart()
    big = b"x" * (PENDING_INPUT_LIMIT + FIFO_BYTES + 100)
    assert u.feed(big) == PENDING_INPUT_LIMIT
    while u.feed(b"y"):  # the first 16 moved on into the FIFO, leaving room for 16 more
        pass
    assert u.input_waiting == PENDING_INPUT_LIMIT + FIFO_BYTES
    u.read(THR, 1)
    assert u.feed(b"y") == 1  # room again once the guest reads


def test_thr_empty_interrupt_as_the_8250_driver_expects():
    line = LevelRecorder(4)
    u, _, _ = uart(line)
    assert u.read(IIR, 1) & 0x0F == IIR_NO_INT and not line.level
    u.write(IER, 1, IER_THRI)  # THR is empty: enabling ETBEI interrupts at once
    assert line.level
    assert u.read(IIR, 1) & 0x0F == IIR_THRI
    assert not line.level  # reading IIR cleared the THR-empty interrupt
    assert u.read(IIR, 1) & 0x0F == IIR_NO_INT
    before = list(line.levels)
    u.write(THR, 1, ord("a"))  # transmitted at once: THR empty again, a new edge
    assert list(line.levels)[len(before) :] == [True] and line.level
    u.write(THR, 1, ord("b"))  # with the line high, a write lowers it first, then raises
    assert list(line.levels)[-2:] == [False, True]
    u.write(IER, 1, 0)
    assert not line.level


def test_received_data_interrupt_outranks_thr_empty():
    line = LevelRecorder(4)
    u, _, _ = uart(line)
    u.write(IER, 1, IER_RDI | IER_THRI)
    u.feed(b"k")
    assert u.read(IIR, 1) & 0x0F == IIR_RDI and line.level
    assert u.read(THR, 1) == ord("k")
    assert u.read(IIR, 1) & 0x0F == IIR_THRI
    assert u.read(IIR, 1) & 0x0F == IIR_NO_INT and not line.level


def test_fifo_control_clears_the_receiver_and_line_registers_read_back():
    u, _, _ = uart()
    u.write(MCR, 1, 0x0B)
    assert u.read(MCR, 1) == 0x0B
    u.feed(b"abc")
    u.write(IIR, 1, 0x01)  # FCR: FIFO on, nothing cleared
    assert u.read(LSR, 1) & LSR_DR
    assert u.read(IIR, 1) & 0xC0 == 0xC0  # IIR shows the FIFOs enabled
    u.write(IIR, 1, 0x03)  # FCR: clear the receive FIFO
    assert not u.read(LSR, 1) & LSR_DR and u.read(THR, 1) == 0
    u.write(LSR, 1, 0x00)  # LSR and MSR are read-only: ignored
    u.write(MSR, 1, 0x00)
    assert u.read(LSR, 1) == LSR_THRE | LSR_TEMT and u.read(MSR, 1) == 0xB0


def test_no_console_discards_output():
    u = Serial16550(None)
    u.write(THR, 1, ord("a"))
    assert u.transmitted == 1


def test_state_round_trips_through_its_record():
    u, _, _ = uart()
    u.write(IER, 1, IER_RDI)
    u.write(SCR, 1, 0x42)
    u.feed(b"hello")
    state = decode(SerialState, encode(u.save_state()), "serial0", StreamFormatError)
    again = Serial16550(None, state=state)
    assert again.save_state() == u.save_state()
    assert bytes(again.read(THR, 1) for _ in range(5)) == b"hello"


def test_a_stalled_console_reader_never_blocks_the_guest():
    r, w = os.pipe()  # nobody reads r: the pipe fills after 64 KiB
    console = ConsoleOutput(os.fdopen(w, "wb"), limit_bytes=256 << 10)
    u = Serial16550(console)
    done = threading.Event()

    def guest():
        for _ in range(1 << 20):  # 1 MiB of output
            u.write(THR, 1, ord("x"))
        done.set()

    t = threading.Thread(target=guest, daemon=True)
    t.start()
    assert done.wait(60), "the guest blocked on the console"
    assert console.dropped > 0 and u.transmitted == 1 << 20
    assert not console.flush(0.2)  # what is queued cannot drain: flush gives up, bounded
    os.close(r)
    console.close(0.5)
