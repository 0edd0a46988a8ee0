import io

from kvmkit.devices.serial import (
    IER_RDI,
    IER_THRI,
    IIR_NO_INT,
    IIR_RDI,
    IIR_THRI,
    LCR_DLAB,
    LSR_DR,
    LSR_TEMT,
    LSR_THRE,
    MCR_LOOP,
    Serial16550,
)

THR, IER, IIR, LCR, MCR, LSR, MSR, SCR = range(8)


def uart():
    out = io.BytesIO()
    return Serial16550(out), out


def test_transmit_goes_to_the_console_by_line():
    u, out = uart()
    for b in b"hi":
        u.write(THR, 1, b)
    assert out.getvalue() == b""  # buffered until a newline
    u.write(THR, 1, ord("\n"))
    assert out.getvalue() == b"hi\n"
    u.write(THR, 1, ord("x"))
    u.flush()
    assert out.getvalue() == b"hi\nx" and u.transmitted == 4


def test_lsr_always_ready_to_transmit_and_reports_received_data():
    u, _ = uart()
    assert u.read(LSR, 1) == LSR_THRE | LSR_TEMT
    u.feed(b"a")
    assert u.read(LSR, 1) & LSR_DR
    assert u.read(THR, 1) == ord("a")
    assert not u.read(LSR, 1) & LSR_DR
    assert u.read(THR, 1) == 0  # empty receiver reads 0


def test_divisor_latch_is_behind_dlab():
    u, out = uart()
    u.write(LCR, 1, LCR_DLAB | 0x03)
    u.write(THR, 1, 0x01)
    u.write(IER, 1, 0x00)
    assert u.read(THR, 1) == 0x01 and u.read(IER, 1) == 0x00
    u.write(LCR, 1, 0x03)
    assert u.read(LCR, 1) == 0x03
    u.flush()
    assert out.getvalue() == b""  # divisor writes are not data


def test_scratch_and_msr():
    u, _ = uart()
    u.write(SCR, 1, 0x5A)
    assert u.read(SCR, 1) == 0x5A
    assert u.read(MSR, 1) == 0xB0


def test_loopback_mode_echoes_into_the_receiver():
    u, out = uart()
    u.write(MCR, 1, MCR_LOOP)
    u.write(THR, 1, ord("z"))
    assert u.read(THR, 1) == ord("z")
    u.flush()
    assert out.getvalue() == b""


def test_interrupt_identification_and_line():
    levels = []
    u = Serial16550(io.BytesIO(), irq=levels.append)
    assert u.read(IIR, 1) & 0x0F == IIR_NO_INT
    u.write(IER, 1, IER_THRI)
    assert levels == [True]
    assert u.read(IIR, 1) & 0x0F == IIR_THRI
    assert levels == [True, False]  # reading IIR cleared the THRE interrupt
    u.write(IER, 1, IER_RDI | IER_THRI)
    u.feed(b"k")
    assert u.read(IIR, 1) & 0x0F == IIR_RDI  # receive data outranks THRE
    u.read(THR, 1)


def test_no_console_discards_output():
    u = Serial16550(None)
    u.write(THR, 1, ord("a"))
    u.flush()
    assert u.transmitted == 1


def test_fifo_control_clears_the_receiver_and_line_registers_read_back():
    u, _ = uart()
    u.write(MCR, 1, 0x0B)
    assert u.read(MCR, 1) == 0x0B
    u.feed(b"abc")
    u.write(IIR, 1, 0x01)  # FCR: FIFO on, nothing cleared
    assert u.read(LSR, 1) & LSR_DR
    u.write(IIR, 1, 0x03)  # FCR: clear the receive FIFO
    assert not u.read(LSR, 1) & LSR_DR and u.read(THR, 1) == 0
    u.write(LSR, 1, 0x00)  # LSR and MSR are read-only: ignored
    u.write(MSR, 1, 0x00)
    assert u.read(LSR, 1) == LSR_THRE | LSR_TEMT and u.read(MSR, 1) == 0xB0


def test_interrupt_changes_without_an_irq_line_are_harmless():
    u = Serial16550(io.BytesIO())  # no irq wired (kvmkit's default machine polls)
    u.write(IER, 1, IER_RDI)
    u.feed(b"q")
    assert u.read(IIR, 1) & 0x0F == IIR_RDI and u.read(THR, 1) == ord("q")
