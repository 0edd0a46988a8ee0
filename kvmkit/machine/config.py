"""`MachineConfig`: what to build, validated into one clear line per problem."""

import os
import re
from dataclasses import dataclass
from pathlib import Path

from kvmkit.errors import ConfigError
from kvmkit.guests.build import BUILTIN, LONG_LOAD, REAL_LOAD, GuestProgram, find_program
from kvmkit.memory.backend import BACKEND_NAMES
from kvmkit.memory.hugepages import HUGEPAGE_SIZES
from kvmkit.memory.layout import MIB, PAGE_SIZE, format_size
from kvmkit.memory.numa import NumaPolicy

DEFAULT_MEMORY = 256 * MIB
MIN_MEMORY = 2 * MIB
MAX_MEMORY = 512 << 30  # what one identity-mapping PDPT covers
MODES = ("long", "real")
HIDE_MODES = ("off", "unmap", "direct-map")
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str | int, what: str = "memory size") -> int:
    """ "512M", "1G", "2GiB", "4096" -> bytes. Raises ConfigError naming the fix."""
    if isinstance(text, int):
        return text
    m = _SIZE_RE.match(text)
    if not m:
        raise ConfigError(
            f"{what} {text!r} is not a size: use a whole number with an optional"
            " K, M, G or T suffix, e.g. 512M or 2G"
        )
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


def parse_int(text: str | int, what: str) -> int:
    """An integer in decimal or 0x hex."""
    if isinstance(text, int):
        return text
    try:
        return int(text, 0)
    except ValueError:
        raise ConfigError(
            f"{what} {text!r} is not a number: use decimal or 0x-prefixed hex"
        ) from None


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
    irqchip: bool = False  # in-kernel PIC, IOAPIC, LAPICs and PIT; HLT then waits in the kernel
    dirty_ring_bytes: int = 0  # per-vCPU dirty ring for dirty tracking (0: the bitmap)

    @property
    def program(self) -> GuestProgram | None:
        """The built-in (or internal) guest program named by `guest`, if it names one."""
        return find_program(self.guest)

    @property
    def builtin(self) -> bool:
        return self.program is not None

    @property
    def cpu_mode(self) -> str:
        if self.program is not None:
            return self.program.mode
        return self.mode or "long"

    @property
    def load_addr(self) -> int:
        if self.program is not None:
            return self.program.load_addr
        if self.entry is not None:
            return self.entry
        return REAL_LOAD if self.cpu_mode == "real" else LONG_LOAD

    def validate(self, max_vcpus: int | None = None, restoring: bool = False) -> None:
        """Raise ConfigError for the first problem found. `max_vcpus` is the host's
        KVM_CAP_MAX_VCPUS when known. A restored machine's guest comes from the snapshot,
        so its guest file need not exist."""
        if self.memory_bytes < MIN_MEMORY:
            raise ConfigError(
                f"memory {format_size(self.memory_bytes)} is too small: kvmkit needs at least"
                f" {format_size(MIN_MEMORY)}"
            )
        if self.memory_bytes > MAX_MEMORY:
            raise ConfigError(
                f"memory {format_size(self.memory_bytes)} is above kvmkit's limit of"
                f" {format_size(MAX_MEMORY)}"
            )
        if self.memory_bytes % PAGE_SIZE:
            raise ConfigError(f"memory {self.memory_bytes} bytes is not a multiple of 4 KiB")
        if self.vcpus < 1:
            raise ConfigError(f"vCPUs must be at least 1, not {self.vcpus}")
        if max_vcpus is not None and self.vcpus > max_vcpus:
            raise ConfigError(
                f"{self.vcpus} vCPUs is above this host's KVM_CAP_MAX_VCPUS ({max_vcpus})"
            )
        if self.memory_backend not in ("auto", *BACKEND_NAMES):
            raise ConfigError(
                f"unknown memory backend {self.memory_backend!r}: choose auto, "
                + " or ".join(BACKEND_NAMES)
            )
        if self.hugepage_size not in HUGEPAGE_SIZES.values():
            raise ConfigError(
                f"hugepage size {format_size(self.hugepage_size)} is not one of"
                f" {', '.join(HUGEPAGE_SIZES)}"
            )
        if self.hide not in HIDE_MODES:
            raise ConfigError(f"unknown hide mode {self.hide!r}: choose {', '.join(HIDE_MODES)}")
        if self.hide != "off" and self.memory_backend not in ("auto", "guest_memfd"):
            raise ConfigError(
                f"--hide-guest-memory needs the guest_memfd backend: {self.memory_backend} memory"
                " is reached through the host mapping"
            )
        ring = self.dirty_ring_bytes
        if ring and (ring < PAGE_SIZE or ring & (ring - 1)):
            raise ConfigError(
                f"dirty ring size {ring} bytes is not a power of two of at least 4 KiB, e.g. 64K"
            )
        if self.numa is not None:
            self.numa.validate()
        if self.mode is not None and self.mode not in MODES:
            raise ConfigError(f"unknown CPU mode {self.mode!r}: choose long or real")
        program = self.program
        if restoring:
            pass
        elif program is not None:
            if self.mode is not None and self.mode != program.mode:
                raise ConfigError(
                    f"built-in guest {self.guest!r} runs in {program.mode} mode, not {self.mode}"
                )
            if self.entry is not None:
                raise ConfigError(
                    f"--entry applies to guest files; built-in {self.guest!r} loads at"
                    f" {program.load_addr:#x}"
                )
        else:
            self._validate_guest_file()
        if self.entry is not None and not 0 <= self.entry < self.memory_bytes:
            raise ConfigError(
                f"entry {self.entry:#x} is outside guest RAM (0x0-{self.memory_bytes:#x})"
            )
        if self.console not in (None, "none"):
            parent = Path(self.console).resolve().parent
            if not parent.is_dir():
                raise ConfigError(f"console file {self.console}: directory {parent} does not exist")

    def _validate_guest_file(self) -> None:
        path = Path(self.guest)
        builtins = ", ".join(BUILTIN)
        if not path.exists():
            raise ConfigError(
                f"guest {self.guest!r} is neither a built-in guest ({builtins}) nor an existing"
                " file"
            )
        if not path.is_file() or not os.access(path, os.R_OK):
            raise ConfigError(f"cannot read guest file {self.guest!r}: it must be a readable file")
        if path.stat().st_size == 0:
            raise ConfigError(f"guest file {self.guest!r} is empty")
