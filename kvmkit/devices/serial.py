"""A 16550A UART: the console, on an interrupt line as Linux's 8250 driver expects.

Registers (offset from the base, DLAB = LCR bit 7):
0 RBR/THR (DLL when DLAB), 1 IER (DLM when DLAB), 2 IIR/FCR, 3 LCR, 4 MCR,
5 LSR, 6 MSR, 7 SCR.

- Transmit: a byte written to THR goes to the console at once, so THR is always
  empty again: THRE and TEMT stay set, and with IER.ETBEI the THR-empty interrupt is
  raised after every write (and when ETBEI is turned on). Reading IIR while THR-empty
  is the interrupt reported clears it, as on the chip.
- Receive: a 16-byte FIFO as on the chip. Host input (`feed`) waits in a bounded
  pending buffer and moves into the FIFO as the guest reads, so console input is never
  lost; bytes written in loopback mode (MCR.LOOP) go straight into the FIFO, and one
  arriving when it is full is dropped and sets LSR.OE (the overrun error), cleared by
  reading LSR.
- Interrupt identification by priority: receiver line status (an overrun, with
  IER.ELSI) 0x06, received data (IER.ERBFI) 0x04, THR empty (IER.ETBEI) 0x02, else
  0x01 (none); bits 7:6 set while the FIFOs are enabled. The line is driven high
  while any enabled interrupt is pending, low otherwise; every THR write lowers it
  before raising it again, so an edge-triggered PIC or IOAPIC pin sees each one.
"""

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from kvmkit.devices.console import ConsoleOutput
from kvmkit.devices.irq import IrqLine, LevelRecorder
from kvmkit.records import U8, bounds

COM1_BASE = 0x3F8
COM1_IRQ = 4
UART_REGS = 8
FIFO_BYTES = 16
PENDING_INPUT_LIMIT = 64 << 10

LSR_DR = 0x01
LSR_OE = 0x02
LSR_THRE = 0x20
LSR_TEMT = 0x40
IER_RDI = 0x01
IER_THRI = 0x02
IER_RLSI = 0x04
IIR_NO_INT = 0x01
IIR_THRI = 0x02
IIR_RDI = 0x04
IIR_RLSI = 0x06
IIR_FIFO_ENABLED = 0xC0
FCR_ENABLE = 0x01
FCR_CLEAR_RX = 0x02
LCR_DLAB = 0x80
MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08
MCR_LOOP = 0x10
MSR_IDLE = 0xB0  # DCD | DSR | CTS: a terminal is attached


@dataclass(frozen=True)
class SerialState:
    """The UART's registers and receive FIFO (pending host input is not guest state)."""

    ier: int = field(default=0, metadata=bounds(*U8))
    lcr: int = field(default=0x03, metadata=bounds(*U8))
    mcr: int = field(default=0x08, metadata=bounds(*U8))
    fcr: int = field(default=0, metadata=bounds(*U8))
    scr: int = field(default=0, metadata=bounds(*U8))
    dll: int = field(default=0x0C, metadata=bounds(*U8))  # 9600 baud
    dlm: int = field(default=0, metadata=bounds(*U8))
    thr_irq_pending: bool = True
    overrun: bool = False
    rx: bytes = field(default=b"", metadata=bounds(0, FIFO_BYTES))
    transmitted: int = field(default=0, metadata=bounds(0, None))


class Serial16550:
    state_version = 2
    state_type = SerialState

    def __init__(
        self,
        out: ConsoleOutput | None,
        irq: IrqLine | None = None,
        state: SerialState | None = None,
        name: str = "serial0",
    ) -> None:
        self.name = name
        self.out = out
        self.irq: IrqLine = irq if irq is not None else LevelRecorder(COM1_IRQ)
        self.lock = threading.Lock()
        s = state or SerialState()
        self.ier, self.lcr, self.mcr, self.fcr = s.ier & 0x0F, s.lcr, s.mcr & 0x1F, s.fcr
        self.scr, self.dll, self.dlm = s.scr, s.dll, s.dlm
        self.thr_irq_pending = s.thr_irq_pending
        self.overrun = s.overrun
        self.rx: deque[int] = deque(s.rx[:FIFO_BYTES])
        self.transmitted = s.transmitted
        self.pending: deque[int] = deque()  # host input waiting for room in the FIFO
        self.on_room: Callable[[], None] | None = None  # the pending input ran out
        self._irq_level = False
        self._update_irq()

    # -- host side ----------------------------------------------------------
    def feed(self, data: bytes) -> int:
        """Queue console input for the guest; returns how many bytes were taken (fewer
        than given once PENDING_INPUT_LIMIT bytes wait: offer the rest later)."""
        with self.lock:
            take = max(0, min(len(data), PENDING_INPUT_LIMIT - len(self.pending)))
            self.pending.extend(data[:take])
            self._refill()
            self._update_irq()
            return take

    @property
    def input_waiting(self) -> int:
        """Bytes of host input not yet read by the guest."""
        with self.lock:
            return len(self.pending) + len(self.rx)

    def flush(self, timeout_s: float = 5.0) -> None:
        if self.out is not None:
            self.out.flush(timeout_s)

    # -- state (snapshots) --------------------------------------------------
    def save_state(self) -> SerialState:
        """Registers and the receive FIFO. Transmitted bytes are already out."""
        with self.lock:
            return SerialState(
                ier=self.ier,
                lcr=self.lcr,
                mcr=self.mcr,
                fcr=self.fcr,
                scr=self.scr,
                dll=self.dll,
                dlm=self.dlm,
                thr_irq_pending=self.thr_irq_pending,
                overrun=self.overrun,
                rx=bytes(self.rx),
                transmitted=self.transmitted,
            )

    # -- guest side ---------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        with self.lock:
            had_pending = bool(self.pending)
            value = self._read(offset)
            self._update_irq()
            drained = had_pending and not self.pending
        if drained and self.on_room is not None:
            self.on_room()
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        with self.lock:
            self._write(offset, value & 0xFF)
            self._update_irq()

    def _read(self, offset: int) -> int:
        dlab = self.lcr & LCR_DLAB
        if offset == 0:
            if dlab:
                return self.dll
            if not self.rx:
                return 0
            byte = self.rx.popleft()
            self._refill()
            return byte
        if offset == 1:
            return self.dlm if dlab else self.ier
        if offset == 2:
            return self._identify()
        if offset == 3:
            return self.lcr
        if offset == 4:
            return self.mcr
        if offset == 5:
            lsr = LSR_THRE | LSR_TEMT | (LSR_DR if self.rx else 0) | (LSR_OE if self.overrun else 0)
            self.overrun = False  # reading LSR clears the error bits
            return lsr
        if offset == 6:
            return self._msr()
        return self.scr

    def _identify(self) -> int:
        fifo = IIR_FIFO_ENABLED if self.fcr & FCR_ENABLE else 0
        if self.ier & IER_RLSI and self.overrun:
            return fifo | IIR_RLSI
        if self.ier & IER_RDI and self.rx:
            return fifo | IIR_RDI
        if self.ier & IER_THRI and self.thr_irq_pending:
            self.thr_irq_pending = False  # reading IIR clears the THR-empty interrupt
            return fifo | IIR_THRI
        return fifo | IIR_NO_INT

    def _msr(self) -> int:
        if not self.mcr & MCR_LOOP:
            return MSR_IDLE
        # Loopback: CTS = RTS, DSR = DTR, RI = OUT1, DCD = OUT2.
        m = self.mcr
        return (
            (0x10 if m & MCR_RTS else 0)
            | (0x20 if m & MCR_DTR else 0)
            | (0x40 if m & MCR_OUT1 else 0)
            | (0x80 if m & MCR_OUT2 else 0)
        )

    def _write(self, offset: int, value: int) -> None:
        dlab = self.lcr & LCR_DLAB
        if offset == 0:
            if dlab:
                self.dll = value
                return
            self.thr_irq_pending = False
            self._update_irq()  # lower first: the THR-empty below is a new edge
            if self.mcr & MCR_LOOP:
                self._receive(value)
            else:
                self._transmit(value)
            self.thr_irq_pending = True
        elif offset == 1:
            if dlab:
                self.dlm = value
            else:
                if value & IER_THRI and not self.ier & IER_THRI:
                    self.thr_irq_pending = True  # THR is empty: the interrupt fires at once
                self.ier = value & 0x0F
        elif offset == 2:
            self.fcr = value & 0xC9
            if value & FCR_CLEAR_RX:
                self.rx.clear()
                self._refill()
        elif offset == 3:
            self.lcr = value
        elif offset == 4:
            self.mcr = value & 0x1F
        elif offset == 7:
            self.scr = value
        # LSR and MSR are read-only

    def _receive(self, byte: int) -> None:
        if len(self.rx) >= FIFO_BYTES:
            self.overrun = True
        else:
            self.rx.append(byte)

    def _refill(self) -> None:
        while self.pending and len(self.rx) < FIFO_BYTES:
            self.rx.append(self.pending.popleft())

    def _transmit(self, byte: int) -> None:
        self.transmitted += 1
        if self.out is not None:
            self.out.write(bytes((byte,)))

    def _update_irq(self) -> None:
        ier = self.ier
        level = bool(
            (ier & IER_RLSI and self.overrun)
            or (ier & IER_RDI and self.rx)
            or (ier & IER_THRI and self.thr_irq_pending)
        )
        if level != self._irq_level:
            self._irq_level = level
            self.irq.set_level(level)
