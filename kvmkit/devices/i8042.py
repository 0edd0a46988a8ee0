"""The i8042 keyboard controller, as far as a guest uses it to reset the machine.

Ports 0x60 (data) and 0x64 (status on read, command on write). Linux reboots a PC
by writing the pulse-reset command 0xFE to port 0x64 (reboot=k, and its fallback
when ACPI is absent); writing the output port (command 0xD1) with bit 0 clear does
the same. Both call `on_reset`. The controller reports no keyboard data, passes its
self test (0xAA -> 0x55) and keeps its command byte.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

from kvmkit.records import U8, bounds

I8042_DATA = 0x60
I8042_COMMAND = 0x64
I8042_PORTS = 5  # 0x60-0x64; 0x61-0x63 are not the controller's (0x61 is the PIT's)
STATUS_OUTPUT_FULL = 0x01
STATUS_SYSTEM = 0x04
CMD_READ_BYTE = 0x20
CMD_WRITE_BYTE = 0x60
CMD_SELF_TEST = 0xAA
CMD_WRITE_OUTPUT = 0xD1
CMD_PULSE_RESET = 0xFE


@dataclass(frozen=True)
class I8042State:
    command_byte: int = field(default=0x45, metadata=bounds(*U8))
    output: int | None = field(default=None, metadata=bounds(*U8))
    expecting: int = field(default=0, metadata=bounds(*U8))  # a command awaiting its data byte


class I8042:
    state_version = 1
    state_type = I8042State

    def __init__(
        self, on_reset: Callable[[], None], state: I8042State | None = None, name: str = "i8042"
    ) -> None:
        self.name = name
        self.on_reset = on_reset
        s = state or I8042State()
        self.command_byte, self.output, self.expecting = s.command_byte, s.output, s.expecting

    def read(self, offset: int, size: int) -> int:
        if offset == 0:  # port 0x60
            value, self.output = self.output, None
            return 0 if value is None else value
        if offset != 4:
            return 0xFF  # nothing there
        return STATUS_SYSTEM | (STATUS_OUTPUT_FULL if self.output is not None else 0)

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        if offset not in (0, 4):
            return
        if offset == 0:  # data for the command that asked for it
            command, self.expecting = self.expecting, 0
            if command == CMD_WRITE_BYTE:
                self.command_byte = value
            elif command == CMD_WRITE_OUTPUT and not value & 1:
                self.on_reset()
            return
        if value == CMD_PULSE_RESET:
            self.on_reset()
        elif value == CMD_READ_BYTE:
            self.output = self.command_byte
        elif value in (CMD_WRITE_BYTE, CMD_WRITE_OUTPUT):
            self.expecting = value
        elif value == CMD_SELF_TEST:
            self.output = 0x55

    def save_state(self) -> I8042State:
        return I8042State(self.command_byte, self.output, self.expecting)
