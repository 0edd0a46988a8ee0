"""A 16550A UART: the console. Output goes to a binary stream as the guest writes it.

Registers (offset from the base, DLAB = LCR bit 7):
0 RBR/THR (DLL when DLAB), 1 IER (DLM when DLAB), 2 IIR/FCR, 3 LCR, 4 MCR,
5 LSR, 6 MSR, 7 SCR. The transmitter is always ready (LSR THRE|TEMT), since
bytes are written straight through; received bytes come from `feed()`.
"""

import threading
from collections import deque
from collections.abc import Callable
from typing import BinaryIO

COM1_BASE = 0x3F8
COM1_IRQ = 4
UART_REGS = 8

LSR_DR = 0x01
LSR_THRE = 0x20
LSR_TEMT = 0x40
IER_RDI = 0x01
IER_THRI = 0x02
IIR_NO_INT = 0x01
IIR_THRI = 0x02
IIR_RDI = 0x04
IIR_FIFO_ENABLED = 0xC0
LCR_DLAB = 0x80
MCR_LOOP = 0x10
MSR_IDLE = 0xB0  # DCD | DSR | CTS


class Serial16550:
    name = "serial"
    state_version = 1

    def __init__(
        self,
        out: BinaryIO | None,
        irq: Callable[[bool], None] | None = None,
    ) -> None:
        self.out = out
        self.irq = irq
        self.lock = threading.Lock()
        self.rx: deque[int] = deque()
        self.ier = 0
        self.lcr = 0x03
        self.mcr = 0x08
        self.fcr = 0
        self.scr = 0
        self.dll = 0x0C  # 9600 baud
        self.dlm = 0
        self.thr_irq_pending = True
        self.transmitted = 0
        self._line = bytearray()
        self._irq_level = False

    # -- host side ----------------------------------------------------------
    def feed(self, data: bytes) -> None:
        """Queue bytes for the guest to read (console input)."""
        with self.lock:
            self.rx.extend(data)
            self._update_irq()

    def flush(self) -> None:
        with self.lock:
            self._flush_line()

    # -- state (snapshots) --------------------------------------------------
    def save_state(self) -> dict[str, object]:
        """Registers and the receive FIFO. Transmitted bytes are already out: `flush()`
        first, so a partial line is not held back."""
        with self.lock:
            regs = ("ier", "lcr", "mcr", "fcr", "scr", "dll", "dlm")
            state: dict[str, object] = {r: getattr(self, r) for r in regs}
            state["thr_irq_pending"] = self.thr_irq_pending
            state["rx"] = bytes(self.rx).hex()
            state["transmitted"] = self.transmitted
            return state

    def load_state(self, state: dict[str, object]) -> None:
        with self.lock:
            for reg in ("ier", "lcr", "mcr", "fcr", "scr", "dll", "dlm"):
                setattr(self, reg, int(state[reg]) & 0xFF)  # type: ignore[call-overload]
            self.thr_irq_pending = bool(state["thr_irq_pending"])
            self.rx = deque(bytes.fromhex(str(state["rx"])))
            self.transmitted = int(state["transmitted"])  # type: ignore[call-overload]
            self._update_irq()

    # -- guest side ---------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        with self.lock:
            value = self._read(offset)
            self._update_irq()
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
            return self.rx.popleft() if self.rx else 0
        if offset == 1:
            return self.dlm if dlab else self.ier
        if offset == 2:
            fifo = IIR_FIFO_ENABLED if self.fcr & 1 else 0
            if self.ier & IER_RDI and self.rx:
                return fifo | IIR_RDI
            if self.ier & IER_THRI and self.thr_irq_pending:
                self.thr_irq_pending = False  # reading IIR clears the THRE interrupt
                return fifo | IIR_THRI
            return fifo | IIR_NO_INT
        if offset == 3:
            return self.lcr
        if offset == 4:
            return self.mcr
        if offset == 5:
            return LSR_THRE | LSR_TEMT | (LSR_DR if self.rx else 0)
        if offset == 6:
            return MSR_IDLE
        return self.scr

    def _write(self, offset: int, value: int) -> None:
        dlab = self.lcr & LCR_DLAB
        if offset == 0:
            if dlab:
                self.dll = value
            elif self.mcr & MCR_LOOP:
                self.rx.append(value)
            else:
                self._transmit(value)
                self.thr_irq_pending = True
        elif offset == 1:
            if dlab:
                self.dlm = value
            else:
                if value & IER_THRI and not self.ier & IER_THRI:
                    self.thr_irq_pending = True
                self.ier = value & 0x0F
        elif offset == 2:
            self.fcr = value
            if value & 0x02:
                self.rx.clear()
        elif offset == 3:
            self.lcr = value
        elif offset == 4:
            self.mcr = value & 0x1F
        elif offset == 7:
            self.scr = value
        # LSR and MSR are read-only

    def _transmit(self, byte: int) -> None:
        self.transmitted += 1
        if self.out is None:
            return
        self._line.append(byte)
        if byte == 0x0A or len(self._line) >= 4096:
            self._flush_line()

    def _flush_line(self) -> None:
        if self._line and self.out is not None:
            self.out.write(self._line)
            self.out.flush()
        self._line.clear()

    def _update_irq(self) -> None:
        level = bool(
            (self.ier & IER_RDI and self.rx) or (self.ier & IER_THRI and self.thr_irq_pending)
        )
        if level != self._irq_level:
            self._irq_level = level
            if self.irq is not None:
                self.irq(level)
