"""The kvmkit guest ABI (version 1): boot info layout, entry registers, ports.

Mirrors src/kvmkit.h, which the guest programs include; tests/unit checks that
the two agree.
"""

import struct
from dataclasses import dataclass, field

BOOT_MAGIC = 0x31544F4F424B4B4B  # "KKKBOOT1" little-endian
BI_MAGIC = 0
BI_RAM_BYTES = 8
BI_NR_VCPUS = 16
BI_FLAGS = 20
BI_NR_RANGES = 24
BI_ARG = 32
BI_CONSOLE_LOCK = 40
BI_DONE = 48
BI_RANGES = 64
BI_MAX_RANGES = 4
BI_SIZE = 128

BOOT_FLAG_PVM_HOST = 1

PORT_POST = 0x80
PORT_COM1 = 0x3F8
PORT_DEBUG_EXIT = 0x501
PORT_PACE = 0x82


@dataclass
class BootInfo:
    """What a long-mode guest learns at entry (RDI points at it)."""

    ram_bytes: int
    nr_vcpus: int
    free_ranges: list[tuple[int, int]] = field(default_factory=list)
    arg: int = 0
    flags: int = 0

    def pack(self) -> bytes:
        if len(self.free_ranges) > BI_MAX_RANGES:
            raise ValueError(f"at most {BI_MAX_RANGES} free ranges fit in boot info")
        head = struct.pack(
            "<QQIIIIQ",
            BOOT_MAGIC,
            self.ram_bytes,
            self.nr_vcpus,
            self.flags,
            len(self.free_ranges),
            0,
            self.arg,
        )
        ranges = b"".join(struct.pack("<QQ", s, e) for s, e in self.free_ranges)
        return head.ljust(BI_RANGES, b"\0") + ranges.ljust(BI_SIZE - BI_RANGES, b"\0")
