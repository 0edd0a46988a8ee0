"""Pre-boot resources: the typed parts a machine is made of, filled in before it exists.

`VmResources` holds one of each part (machine spec, boot source, console, ...). The
command line fills them at once (kvmkit/machine/config.py's `MachineConfig`); an API
fills them one request at a time (each `set_*` validates what it is given, and
`validate()` checks the whole against the host before the builder consumes it).
Every problem is a ConfigError: one line naming the value and the fix.
"""

import os
import re
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


MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$", re.IGNORECASE | re.ASCII)
MAX_DRIVES = 16
MAX_NETS = 8
IFNAMSIZ = 16  # the kernel's interface name buffer, with its NUL
DEVICE_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$", re.ASCII)
VSOCK_HOST_CID = 2  # 0 hypervisor, 1 local, 2 host: a guest's CID is 3 or more
UDS_MAX = 107  # sun_path, less the NUL; the vsock adds "_PORT" for guest connections


def _check_device_id(kind: str, device_id: str) -> None:
    if not DEVICE_ID_RE.match(device_id):
        shown = device_id if len(device_id) <= 40 else device_id[:40] + "..."
        raise ConfigError(
            f"{kind} id {shown!r} is not valid: use 1 to 64 letters, digits, '_' or '-'"
        )


@dataclass(frozen=True)
class DriveSpec:
    """A virtio-blk disk: a raw file or block device (Firecracker's /drives/{id})."""

    drive_id: str
    path: str
    read_only: bool = False
    root: bool = False  # the guest's root file system: root=/dev/vdX on the command line
    serial: str | None = None  # the VIRTIO_BLK_T_GET_ID string (20 bytes); default: drive_id
    cache: str = "unsafe"  # unsafe (flush is a no-op) or writeback (flush is fsync)

    def validate(self) -> None:
        _check_device_id("drive", self.drive_id)
        p = Path(self.path)
        if not p.exists():
            raise ConfigError(f"drive {self.drive_id}: {self.path} does not exist")
        if p.is_dir():
            raise ConfigError(f"drive {self.drive_id}: {self.path} is a directory: give a file")
        from kvmkit.devices.virtio.blk import open_backing  # only with a drive to check

        try:  # opened now to say why not (EROFS, EACCES, ...); the device opens it again
            fd, _ = open_backing(self.drive_id, self.path, self.read_only)
        except ConfigError as e:
            fix = (
                "give a file kvmkit can read"
                if self.read_only
                else "make the drive read-only (--drive ...,ro; is_read_only in the API) or"
                " give a writable file"
            )
            raise ConfigError(f"{e}; {fix}") from None
        os.close(fd)
        if self.cache not in ("unsafe", "writeback"):
            raise ConfigError(
                f"drive {self.drive_id}: unknown cache type {self.cache!r}: choose unsafe or"
                " writeback"
            )
        if self.serial is not None and (
            len(self.serial.encode()) > 20 or not self.serial.isprintable()
        ):
            raise ConfigError(
                f"drive {self.drive_id}: serial {self.serial[:40]!r} must be at most 20"
                " printable bytes"
            )


@dataclass(frozen=True)
class NetSpec:
    """A virtio-net interface on a host tap device (Firecracker's
    /network-interfaces/{id}). `mac`: the guest's MAC (None: one kvmkit derives)."""

    iface_id: str
    tap: str
    mac: str | None = None

    def validate(self) -> None:
        _check_device_id("network interface", self.iface_id)
        if (
            not 0 < len(self.tap.encode()) < IFNAMSIZ
            or "/" in self.tap
            or self.tap.strip() != (self.tap)
        ):
            raise ConfigError(
                f"network interface {self.iface_id}: tap name {self.tap[:40]!r} must be 1 to"
                f" {IFNAMSIZ - 1} characters without '/' or spaces"
            )
        if self.mac is not None:
            if not MAC_RE.match(self.mac):
                raise ConfigError(
                    f"network interface {self.iface_id}: MAC {self.mac[:40]!r} is not of the"
                    " form 06:00:ac:10:00:02"
                )
            if int(self.mac[:2], 16) & 1:
                raise ConfigError(
                    f"network interface {self.iface_id}: MAC {self.mac} is a multicast address:"
                    " the first byte must be even (e.g. 06:...)"
                )


@dataclass(frozen=True)
class VsockSpec:
    """A virtio-vsock device in Firecracker's hybrid style: guest connections to port P
    reach the host unix socket `<uds>_P`; host clients connect to `uds` and send
    `CONNECT P\n`."""

    cid: int
    uds: str

    def validate(self) -> None:
        if not VSOCK_HOST_CID < self.cid < 1 << 32:
            raise ConfigError(
                f"vsock guest CID {self.cid} is out of range: use 3 to 4294967295 (0-2 are"
                " reserved)"
            )
        if len(os.fsencode(self.uds)) + 11 > UDS_MAX:
            raise ConfigError(
                f"vsock socket path {self.uds[:60]!r} is too long for a unix socket (with"
                f" '_PORT' added it must fit {UDS_MAX} bytes): use a shorter path"
            )
        parent = Path(self.uds).resolve().parent
        if not parent.is_dir():
            raise ConfigError(f"vsock socket {self.uds}: directory {parent} does not exist")
        if Path(self.uds).exists():
            raise ConfigError(
                f"vsock socket {self.uds} already exists: remove it or choose another path"
            )


@dataclass(frozen=True)
class BalloonSpec:
    """A virtio-balloon: the target size to take from the guest, statistics every
    `stats_interval_s` seconds (0: off), deflate on the guest's OOM, free page
    reporting. Pages the guest gives are punched out of the memory backing."""

    amount_mib: int = 0
    deflate_on_oom: bool = False
    stats_interval_s: int = 0
    free_page_reporting: bool = False

    def validate(self, memory_bytes: int) -> None:
        if not 0 <= self.amount_mib <= memory_bytes >> 20:
            raise ConfigError(
                f"balloon target {self.amount_mib} MiB is outside 0 to the guest's"
                f" {memory_bytes >> 20} MiB"
            )
        if not 0 <= self.stats_interval_s <= 3600:
            raise ConfigError(
                f"balloon statistics interval {self.stats_interval_s} s: use 0 (off) to 3600"
            )


@dataclass(frozen=True)
class EntropySpec:
    """A virtio-rng device fed from the host's getrandom()."""


@dataclass(frozen=True)
class VmResources:
    """Everything a machine is built from. Immutable: `with_*` gives a changed copy."""

    machine: MachineSpec = field(default_factory=MachineSpec)
    boot: BootSource = field(default_factory=ProgramBoot)
    console: ConsoleSpec = field(default_factory=ConsoleSpec)
    drives: tuple[DriveSpec, ...] = ()
    nets: tuple[NetSpec, ...] = ()
    vsock: VsockSpec | None = None
    balloon: BalloonSpec | None = None
    entropy: EntropySpec | None = None

    def with_machine(self, spec: MachineSpec) -> "VmResources":
        spec.validate()
        return replace(self, machine=spec)

    def with_boot(self, boot: BootSource) -> "VmResources":
        return replace(self, boot=boot)

    def with_console(self, console: ConsoleSpec) -> "VmResources":
        console.validate()
        return replace(self, console=console)

    def with_drive(self, drive: DriveSpec) -> "VmResources":
        """Add `drive`, or replace the drive of the same id."""
        drive.validate()
        others = tuple(d for d in self.drives if d.drive_id != drive.drive_id)
        if drive.root and any(d.root for d in others):
            root = next(d for d in others if d.root)
            raise ConfigError(
                f"drive {drive.drive_id}: drive {root.drive_id} is already the root device:"
                " only one drive can be"
            )
        if len(others) >= MAX_DRIVES:
            raise ConfigError(f"drive {drive.drive_id}: kvmkit takes at most {MAX_DRIVES} drives")
        for d in others:
            if not d.read_only and not drive.read_only and _same_file(d.path, drive.path):
                raise ConfigError(
                    f"drive {drive.drive_id}: {drive.path} is already drive {d.drive_id}, and"
                    " two guest disks writing one file corrupt it: give each its own file, or"
                    " make one read-only"
                )
        kept = [d if d.drive_id != drive.drive_id else drive for d in self.drives]
        if len(others) == len(self.drives):
            kept.append(drive)
        return replace(self, drives=tuple(kept))

    def with_net(self, net: NetSpec) -> "VmResources":
        """Add `net`, or replace the interface of the same id."""
        net.validate()
        others = [n for n in self.nets if n.iface_id != net.iface_id]
        for n in others:
            if n.tap == net.tap:
                raise ConfigError(
                    f"network interface {net.iface_id}: tap {net.tap} is already {n.iface_id}'s"
                )
            if net.mac is not None and n.mac is not None and n.mac.lower() == net.mac.lower():
                raise ConfigError(
                    f"network interface {net.iface_id}: MAC {net.mac} is already {n.iface_id}'s"
                )
        if len(others) >= MAX_NETS:
            raise ConfigError(f"network interface {net.iface_id}: kvmkit takes at most {MAX_NETS}")
        kept = [n if n.iface_id != net.iface_id else net for n in self.nets]
        if len(others) == len(self.nets):
            kept.append(net)
        return replace(self, nets=tuple(kept))

    def with_vsock(self, vsock: VsockSpec) -> "VmResources":
        vsock.validate()
        return replace(self, vsock=vsock)

    def with_balloon(self, balloon: BalloonSpec) -> "VmResources":
        balloon.validate(self.machine.memory_bytes)
        return replace(self, balloon=balloon)

    def with_entropy(self, entropy: EntropySpec) -> "VmResources":
        return replace(self, entropy=entropy)

    def validate(self, max_vcpus: int | None = None) -> None:
        """Raise ConfigError for the first problem; `max_vcpus` is the host's limit."""
        self.machine.validate(max_vcpus)
        self.boot.validate(self.machine.memory_bytes)
        self.console.validate()
        for drive in self.drives:
            drive.validate()
        for net in self.nets:
            net.validate()
        if self.balloon is not None:
            self.balloon.validate(self.machine.memory_bytes)
        if isinstance(self.boot, LinuxBoot) and self.machine.vcpus > 1 and not self.machine.irqchip:
            raise ConfigError(
                "Linux on more than one vCPU needs the in-kernel irqchip (its APs start by"
                " INIT/SIPI through the LAPIC): drop --no-irqchip or use --vcpus 1"
            )


def _same_file(a: str, b: str) -> bool:
    """Whether two paths name one file (hard links and symlinks too)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False
