"""`MachineConfig`: a machine described in one flat record (the command line's and the
tests' way), turned into pre-boot resources (kvmkit/machine/resources.py) for the
builder; and the parsers of sizes and numbers, each failing with one clear line."""

import re
from dataclasses import dataclass

from kvmkit.errors import ConfigError
from kvmkit.guests.build import GuestProgram
from kvmkit.machine.resources import (
    DEFAULT_MEMORY,
    HIDE_MODES,
    MAX_MEMORY,
    MIN_MEMORY,
    MODES,
    ConsoleSpec,
    MachineSpec,
    ProgramBoot,
    VmResources,
)
from kvmkit.memory.numa import NumaPolicy

__all__ = [
    "DEFAULT_MEMORY",
    "HIDE_MODES",
    "MAX_MEMORY",
    "MIN_MEMORY",
    "MODES",
    "MachineConfig",
    "parse_int",
    "parse_size",
]

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE_RE = re.compile(r"^\s*([0-9]{1,20})\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE | re.ASCII)
_INT_RE = re.compile(r"^\s*(0x[0-9a-f]{1,16}|[0-9]{1,20})\s*$", re.IGNORECASE | re.ASCII)


def parse_size(text: str | int, what: str = "memory size") -> int:
    """ "512M", "1G", "2GiB", "4096" -> bytes. Raises ConfigError naming the fix."""
    if isinstance(text, int):
        return text
    m = _SIZE_RE.match(text)
    if not m:
        shown = text if len(text) <= 40 else text[:40] + "..."
        raise ConfigError(
            f"{what} {shown!r} is not a size: use a whole number with an optional"
            " K, M, G or T suffix, e.g. 512M or 2G"
        )
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


def parse_int(text: str | int, what: str) -> int:
    """A non-negative integer in decimal or 0x hex, of at most 64 bits."""
    if isinstance(text, int):
        return text
    m = _INT_RE.match(text)
    value = int(m.group(1), 0) if m else -1
    if not 0 <= value < 1 << 64:
        shown = text if len(text) <= 40 else text[:40] + "..."
        raise ConfigError(
            f"{what} {shown!r} is not a number: use decimal or 0x-prefixed hex, from 0 to 2**64-1"
        )
    return value


@dataclass(frozen=True)
class MachineConfig:
    """A machine to build. `guest` is a built-in name or a path to a flat binary."""

    memory_bytes: int = DEFAULT_MEMORY
    vcpus: int = 1
    memory_backend: str = "auto"
    guest: str = "hello"
    entry: int | None = None
    mode: str | None = None
    console: str | None = None  # None: stdout; "none": discarded; else a file path
    guest_arg: int = 0
    hugepage_size: int = 2 << 20  # for the hugetlb backend
    prealloc: bool = False
    numa: NumaPolicy | None = None
    hide: str = "off"  # off, unmap (no host mapping of guest RAM), direct-map (and no direct map)
    irqchip: bool = True  # in-kernel PIC, IOAPIC, LAPICs and PIT
    dirty_ring_bytes: int = 0  # per-vCPU dirty ring for dirty tracking (0: the bitmap)

    def resources(self) -> VmResources:
        return VmResources(
            machine=MachineSpec(
                vcpus=self.vcpus,
                memory_bytes=self.memory_bytes,
                memory_backend=self.memory_backend,
                hugepage_size=self.hugepage_size,
                prealloc=self.prealloc,
                numa=self.numa,
                hide=self.hide,
                irqchip=self.irqchip,
                dirty_ring_bytes=self.dirty_ring_bytes,
            ),
            boot=self.boot(),
            console=ConsoleSpec(self.console),
        )

    def boot(self) -> ProgramBoot:
        return ProgramBoot(self.guest, self.entry, self.mode, self.guest_arg)

    @property
    def program(self) -> GuestProgram | None:
        return self.boot().program

    @property
    def cpu_mode(self) -> str:
        return self.boot().cpu_mode

    @property
    def load_addr(self) -> int:
        return self.boot().load_addr

    def validate(self, max_vcpus: int | None = None) -> None:
        """Raise ConfigError for the first problem found. `max_vcpus` is the host's
        KVM_CAP_MAX_VCPUS when known."""
        self.resources().validate(max_vcpus)
