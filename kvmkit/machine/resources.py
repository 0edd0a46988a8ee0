"""Pre-boot resources: the typed parts a machine is made of, filled in before it exists.

`VmResources` holds one of each part (machine spec, boot source, console, ...). The
command line fills them at once (kvmkit/machine/config.py's `MachineConfig`); an API
fills them one request at a time (each `set_*` validates what it is given, and
`validate()` checks the whole against the host before the builder consumes it).
Every problem is a ConfigError: one line naming the value and the fix.
"""

import os
from dataclasses import dataclass, field, replace
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
UNCLAIMED_IO = ("crash", "ignore")


@dataclass(frozen=True)
class MachineSpec:
    """vCPUs, memory and the platform: Firecracker's machine-config plus kvmkit's
    memory extensions."""

    vcpus: int = 1
    memory_bytes: int = DEFAULT_MEMORY
    memory_backend: str = "auto"
    hugepage_size: int = 2 << 20  # for the hugetlb backend
    prealloc: bool = False
    numa: NumaPolicy | None = None
    hide: str = "off"  # off, unmap (no host mapping of guest RAM), direct-map (and no direct map)
    irqchip: bool = True  # KVM's in-kernel PIC, IOAPIC, LAPICs and PIT
    dirty_ring_bytes: int = 0  # per-vCPU dirty ring for dirty tracking (0: the bitmap)
    unclaimed_io: str = "crash"  # an access no device claims: crash (exit 3) or ignore

    def validate(self, max_vcpus: int | None = None) -> None:
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
        if self.memory_backend == "hugetlb" and self.memory_bytes % self.hugepage_size:
            smaller = " or --hugepage-size 2M" if self.hugepage_size > 2 << 20 else ""
            raise ConfigError(
                f"memory {format_size(self.memory_bytes)} is not a multiple of the"
                f" {format_size(self.hugepage_size)} hugepage size: give a multiple{smaller}"
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
        if self.unclaimed_io not in UNCLAIMED_IO:
            raise ConfigError(
                f"unknown unclaimed-I/O policy {self.unclaimed_io!r}: choose crash or ignore"
            )
        if self.numa is not None:
            self.numa.validate()


@dataclass(frozen=True)
class ProgramBoot:
    """Boot a guest program: a built-in name (`kvmkit guests`) or a flat binary file,
    entered at `entry` in `mode`, with `guest_arg` in its boot info."""

    guest: str = "hello"
    entry: int | None = None
    mode: str | None = None
    guest_arg: int = 0

    @property
    def program(self) -> GuestProgram | None:
        """The built-in (or internal) guest program `guest` names, if it names one."""
        return find_program(self.guest)

    @property
    def cpu_mode(self) -> str:
        program = self.program
        if program is not None:
            return program.mode
        return self.mode or "long"

    @property
    def load_addr(self) -> int:
        program = self.program
        if program is not None:
            return program.load_addr
        if self.entry is not None:
            return self.entry
        return REAL_LOAD if self.cpu_mode == "real" else LONG_LOAD

    def image(self) -> bytes:
        program = self.program
        if program is not None:
            return program.build()
        return Path(self.guest).read_bytes()

    def validate(self, memory_bytes: int) -> None:
        if self.mode is not None and self.mode not in MODES:
            raise ConfigError(f"unknown CPU mode {self.mode!r}: choose long or real")
        if not 0 <= self.guest_arg < 1 << 64:
            raise ConfigError(
                f"guest argument {self.guest_arg} is out of range: it is an unsigned 64-bit"
                " number (0 to 18446744073709551615)"
            )
        program = self.program
        if program is not None:
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
            self._validate_file()
        if self.entry is not None and not 0 <= self.entry < memory_bytes:
            raise ConfigError(f"entry {self.entry:#x} is outside guest RAM (0x0-{memory_bytes:#x})")

    def _validate_file(self) -> None:
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


BOOT_PROTOCOLS = ("auto", "pvh", "boot64")
MAX_CMDLINE = 1 << 16


@dataclass(frozen=True)
class LinuxBoot:
    """Boot a Linux kernel: an uncompressed vmlinux (entered through PVH or the 64-bit
    boot protocol) or a bzImage, with an optional initrd and a command line (to which
    kvmkit adds what the host needs: see kvmkit/machine/linux_boot.py)."""

    kernel: str
    initrd: str | None = None
    cmdline: str = "console=ttyS0"
    protocol: str = "auto"

    def validate(self, memory_bytes: int) -> None:
        for what, path in (("kernel", self.kernel), ("initrd", self.initrd)):
            if path is None:
                continue
            p = Path(path)
            if not p.exists():
                raise ConfigError(f"{what} {path} does not exist")
            if not p.is_file() or not os.access(p, os.R_OK):
                raise ConfigError(f"cannot read {what} {path}: it must be a readable file")
        if self.protocol not in BOOT_PROTOCOLS:
            raise ConfigError(
                f"unknown boot protocol {self.protocol!r}: choose {', '.join(BOOT_PROTOCOLS)}"
            )
        if len(self.cmdline) > MAX_CMDLINE or "\0" in self.cmdline:
            raise ConfigError(
                f"the kernel command line is {len(self.cmdline)} characters or holds a NUL:"
                " give a shorter one"
            )


BootSource = ProgramBoot | LinuxBoot


@dataclass(frozen=True)
class ConsoleSpec:
    """Where the UART's output goes: None for stdout, "none" to discard, else a file."""

    target: str | None = None

    def validate(self) -> None:
        if self.target in (None, "none"):
            return
        path = Path(self.target)
        if path.is_dir():
            raise ConfigError(f"console {self.target}: is a directory: give a file name")
        parent = path.resolve().parent
        if not parent.is_dir():
            raise ConfigError(f"console file {self.target}: directory {parent} does not exist")


@dataclass(frozen=True)
class VmResources:
    """Everything a machine is built from. Immutable: `with_*` gives a changed copy."""

    machine: MachineSpec = field(default_factory=MachineSpec)
    boot: BootSource = field(default_factory=ProgramBoot)
    console: ConsoleSpec = field(default_factory=ConsoleSpec)

    def with_machine(self, spec: MachineSpec) -> "VmResources":
        spec.validate()
        return replace(self, machine=spec)

    def with_boot(self, boot: BootSource) -> "VmResources":
        return replace(self, boot=boot)

    def with_console(self, console: ConsoleSpec) -> "VmResources":
        console.validate()
        return replace(self, console=console)

    def validate(self, max_vcpus: int | None = None) -> None:
        """Raise ConfigError for the first problem; `max_vcpus` is the host's limit."""
        self.machine.validate(max_vcpus)
        self.boot.validate(self.machine.memory_bytes)
        self.console.validate()
        if isinstance(self.boot, LinuxBoot) and self.machine.vcpus > 1 and not self.machine.irqchip:
            raise ConfigError(
                "Linux on more than one vCPU needs the in-kernel irqchip (its APs start by"
                " INIT/SIPI through the LAPIC): drop --no-irqchip or use --vcpus 1"
            )
