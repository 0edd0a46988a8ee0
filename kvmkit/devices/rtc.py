"""A CMOS real-time clock (MC146818) at ports 0x70 (index) and 0x71 (data).

Linux reads the wall-clock time here at boot, and without a clock it spins for
seconds waiting for an update cycle (`mc146818_avoid_UIP`). The time is the host's
UTC plus an offset the guest can change by writing the time registers (with SET in
register B). No update interrupts are raised (no IRQ 8): the update-in-progress bit
always reads clear, and register D reports the battery good.
"""

import time
from dataclasses import dataclass, field

from kvmkit.records import U8, bounds

RTC_PORT = 0x70
RTC_PORTS = 2
CMOS_BYTES = 128

SECONDS, MINUTES, HOURS, WEEKDAY, DAY, MONTH, YEAR = 0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09
REG_A, REG_B, REG_C, REG_D = 0x0A, 0x0B, 0x0C, 0x0D
CENTURY = 0x32
REG_B_SET = 0x80
REG_B_BINARY = 0x04
REG_B_24H = 0x02
REG_D_VRT = 0x80
TIME_REGS = (SECONDS, MINUTES, HOURS, WEEKDAY, DAY, MONTH, YEAR, CENTURY)


@dataclass(frozen=True)
class RtcState:
    index: int = field(default=0, metadata=bounds(0, CMOS_BYTES - 1))
    offset_s: int = 0  # guest time - host time
    reg_a: int = field(default=0x26, metadata=bounds(*U8))
    reg_b: int = field(default=REG_B_24H, metadata=bounds(*U8))
    ram: bytes = field(default=bytes(CMOS_BYTES), metadata=bounds(CMOS_BYTES, CMOS_BYTES))


class CmosRtc:
    state_version = 1
    state_type = RtcState

    def __init__(self, state: RtcState | None = None, name: str = "rtc") -> None:
        self.name = name
        s = state or RtcState()
        self.index = s.index
        self.offset_s = s.offset_s
        self.reg_a, self.reg_b = s.reg_a, s.reg_b
        self.ram = bytearray(s.ram)
        self._set: dict[int, int] = {}  # time registers written while SET is on

    def read(self, offset: int, size: int) -> int:
        if offset == 0:
            return self.index
        i = self.index
        if i in TIME_REGS:
            return self._encode(self._clock()[i])
        if i == REG_A:
            return self.reg_a & 0x7F  # UIP (bit 7) always clear
        if i == REG_B:
            return self.reg_b
        if i == REG_C:
            return 0  # no interrupt flags
        if i == REG_D:
            return REG_D_VRT
        return self.ram[i]

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        if offset == 0:
            self.index = value & 0x7F  # bit 7 masks NMIs on a PC; nothing to mask here
            return
        i = self.index
        if i in TIME_REGS:
            self._set[i] = self._decode(value)
        elif i == REG_A:
            self.reg_a = value & 0x7F
        elif i == REG_B:
            was_set = self.reg_b & REG_B_SET
            self.reg_b = value
            if was_set and not value & REG_B_SET:
                self._apply_set()
        elif i not in (REG_C, REG_D):
            self.ram[i] = value

    def save_state(self) -> RtcState:
        return RtcState(self.index, self.offset_s, self.reg_a, self.reg_b, bytes(self.ram))

    # -- time ---------------------------------------------------------------------
    def _clock(self) -> dict[int, int]:
        t = time.gmtime(time.time() + self.offset_s)
        return {
            SECONDS: t.tm_sec,
            MINUTES: t.tm_min,
            HOURS: t.tm_hour,
            WEEKDAY: (t.tm_wday + 1) % 7 + 1,  # 1 = Sunday
            DAY: t.tm_mday,
            MONTH: t.tm_mon,
            YEAR: t.tm_year % 100,
            CENTURY: t.tm_year // 100,
        }

    def _apply_set(self) -> None:
        now = self._clock()
        fields = {**now, **self._set}
        self._set.clear()
        year = fields[CENTURY] * 100 + fields[YEAR]
        try:
            guest = time.mktime(
                (
                    year,
                    fields[MONTH],
                    fields[DAY],
                    fields[HOURS],
                    fields[MINUTES],
                    fields[SECONDS],
                    0,
                    0,
                    0,
                )
            ) - time.mktime(time.gmtime(0))
        except (OverflowError, ValueError):
            return  # a nonsense date: keep the clock as it was
        self.offset_s = int(guest - time.time())

    def _encode(self, value: int) -> int:
        if self.reg_b & REG_B_BINARY:
            return value & 0xFF
        return ((value // 10) % 10) << 4 | value % 10

    def _decode(self, value: int) -> int:
        if self.reg_b & REG_B_BINARY:
            return value
        return (value >> 4) * 10 + (value & 0x0F)
