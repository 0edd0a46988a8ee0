"""The one builder of machines, with two roads (as Firecracker's build-for-boot and
build-from-snapshot):

- `build_for_boot(resources)`: from pre-boot resources: a VM, its memory, the
  platform's devices, the guest loaded, vCPUs set up to enter it.
- `build_from_saved(source)`: from a saved description (a snapshot file or an incoming
  migration): the same VM, memory layout and devices at the same places, memory
  filled by the source, then every device rebuilt from its configuration plus its
  saved state and every vCPU given its saved state.

Anything that fails on the way closes what was built and raises; nothing runs.
"""

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol

from kvmkit.devices.bus import Device
from kvmkit.devices.console import ConsoleOutput
from kvmkit.devices.debug_exit import DEBUG_EXIT_LEN, DEBUG_EXIT_PORT, DebugExit
from kvmkit.devices.i8042 import I8042, I8042_DATA, I8042_PORTS
from kvmkit.devices.pace import PACE_PORT, PaceClock
from kvmkit.devices.post import POST_PORT, PostCode
from kvmkit.devices.rtc import RTC_PORT, RTC_PORTS, CmosRtc
from kvmkit.devices.serial import COM1_BASE, COM1_IRQ, UART_REGS, Serial16550
from kvmkit.errors import ConfigError
from kvmkit.guests.abi import BOOT_FLAG_PVM_HOST
from kvmkit.kvm import Kvm, KvmError, KvmUnsupportedError, Vcpu
from kvmkit.machine.boot import BootPlan, load_long_mode, load_real_mode, setup_vcpu
from kvmkit.machine.config import MachineConfig
from kvmkit.machine.console import open_console
from kvmkit.machine.device_manager import DeviceManager, Placement
from kvmkit.machine.event_loop import EventLoop
from kvmkit.machine.kernel_console import KernelConsole
from kvmkit.machine.machine import Machine, MachineParts
from kvmkit.machine.resources import LinuxBoot, ProgramBoot, VmResources
from kvmkit.machine.run_control import RunControl
from kvmkit.memory import GuestMemory
from kvmkit.memory.dirty_ring import DirtyRings
from kvmkit.memory.layout import format_size
from kvmkit.records import decode, encode
from kvmkit.snapshot.format import StreamFormatError
from kvmkit.snapshot.model import (
    MODEL_VERSION,
    BootRecord,
    DevicePlacementRecord,
    DeviceRecord,
    MachineDescription,
    MachineState,
    RegionRecord,
    decode_device_state,
)
from kvmkit.uapi.caps import Cap
from kvmkit.uapi.cpu import KVM_MP_STATE_RUNNABLE

if TYPE_CHECKING:
    from types import ModuleType


def _virtio() -> "ModuleType":
    """The virtio kinds (kvmkit/machine/virtio_devices.py), imported only by a machine
    that has or had virtio devices: a plain run does not pay for them."""
    from kvmkit.machine import virtio_devices

    return virtio_devices


def _wants_virtio(r: VmResources) -> bool:
    return bool(r.drives or r.nets or r.vsock or r.balloon or r.entropy)


class SavedSource(Protocol):
    """A saved machine to rebuild: a snapshot file or an incoming migration."""

    @property
    def what(self) -> str:
        """For messages: "snapshot PATH", "the incoming migration"."""

    @property
    def header(self) -> dict[str, Any]: ...

    @property
    def description(self) -> MachineDescription: ...

    def load(self, memory: GuestMemory) -> MachineState:
        """Fill `memory` (or arrange for it to be filled) and return the rest of the
        state. Called once the VM and memory exist, before any device or vCPU."""
        ...


@dataclass(frozen=True)
class RestoreOptions:
    memory_backend: str | None = None  # another backend than the saved machine's
    console: str | None = None  # the console target, as ConsoleSpec.target
    console_stream: BinaryIO | None = None  # or a stream to write it to
    drive_paths: dict[str, str] | None = None  # drive id -> a replacement backing file
    net_taps: dict[str, str] | None = None  # interface id -> another tap to attach
    vsock_uds: str | None = None  # another path for the vsock's unix socket


class _Assembly:
    """What a build has made so far, closed in reverse if the build fails."""

    def __init__(self) -> None:
        self.control = RunControl()
        self.kvm = Kvm()
        try:
            self.vm = self.kvm.create_vm()
        except BaseException:
            self.kvm.close()
            raise
        self.memory: GuestMemory | None = None
        self.events = EventLoop(self.control.device_error)
        self.devices: DeviceManager | None = None
        self.console: ConsoleOutput | None = None
        self.vcpus: list[Vcpu] = []
        self.plan: BootPlan | None = None
        self.dirty_rings: DirtyRings | None = None
        self.notes: list[str] = []
        self.virtio: dict[str, tuple[str, object]] = {}  # device id -> (kind, config)

    def platform(self, irqchip: bool, dirty_ring_bytes: int) -> None:
        if dirty_ring_bytes:  # before the first vCPU
            flavour = self.vm.enable_dirty_ring(dirty_ring_bytes)
            self.notes.append(
                f"dirty ring: {format_size(dirty_ring_bytes)} per vCPU ({flavour}), used"
                " instead of the dirty bitmap when the machine is migrated"
            )
        if irqchip:
            self.vm.create_irqchip()
            self.vm.create_pit2()
        self.devices = DeviceManager(self.vm, self.events, irqchip)

    def add_platform_devices(self, saved: MachineState | None) -> None:
        assert self.devices is not None
        for p in PLATFORM:
            state = None if saved is None else _saved_state(saved, p.id, p.cls)
            device = p.make(self, state)
            self.devices.add_pio(device, p.base, p.length, p.gsi)

    def add_virtio_devices(self, resources: VmResources) -> None:
        """The boot road: every virtio device the resources ask for, in kind order."""
        assert self.devices is not None and self.memory is not None
        if not _wants_virtio(resources):
            return
        virtio = _virtio()
        add_virtio_device = virtio.add_virtio_device
        context = virtio.VirtioContext(self.memory, events=self.events)
        for kind in virtio.KINDS.values():
            for device_id, config in kind.configs(resources):
                irq = self.devices.irq_line(device_id, irqfd=True)
                device = kind.make(device_id, context, irq, config, None)
                try:
                    add_virtio_device(self.devices, self.events, device)
                except BaseException:
                    device.release()
                    raise
                self.virtio[device_id] = (kind.kind, getattr(device, "config", config))

    def add_saved_virtio_devices(
        self, d: MachineDescription, saved: MachineState, o: RestoreOptions
    ) -> None:
        """The saved road: each virtio device rebuilt from its configuration and state,
        at the MMIO base and GSI it had, with the replacements `o` names."""
        assert self.devices is not None and self.memory is not None
        if not any(r.kind.startswith("virtio-") for r in d.devices):
            return  # overrides without devices were refused by _check_overrides
        virtio = _virtio()
        add_virtio_device = virtio.add_virtio_device
        context = virtio.VirtioContext(
            self.memory, o.drive_paths or {}, self.events, o.net_taps or {}, o.vsock_uds
        )
        for record in d.devices:
            kind = virtio.KINDS.get(record.kind)
            if kind is None:
                continue
            where = f"machine section: device {record.id!r}: config"
            config: object = decode(kind.config_type, record.config, where, StreamFormatError)
            state = _saved_state(saved, record.id, kind.cls)
            irq = self.devices.irq_line(record.id, record.gsi, irqfd=True)
            device = kind.make(record.id, context, irq, config, state)
            placement = Placement(record.id, "mmio", record.base, record.length, record.gsi)
            try:
                add_virtio_device(self.devices, self.events, device, placement)
            except BaseException:
                device.release()
                raise
            self.virtio[record.id] = (kind.kind, getattr(device, "config", config))

    def machine(self, description: MachineDescription, resources: VmResources | None) -> Machine:
        assert self.memory is not None and self.devices is not None and self.console is not None
        return Machine(
            MachineParts(
                control=self.control,
                kvm=self.kvm,
                vm=self.vm,
                memory=self.memory,
                vcpus=self.vcpus,
                devices=self.devices,
                events=self.events,
                console=self.console,
                description=description,
                resources=resources,
                plan=self.plan,
                dirty_rings=self.dirty_rings,
                notes=self.notes,
            )
        )

    def close(self) -> None:
        if self.devices is not None:
            self.devices.close()
        self.events.close()
        if self.console is not None:
            self.console.close(0.5)
        for vcpu in self.vcpus:
            vcpu.close()
        if self.memory is not None:
            self.memory.close()
        self.vm.close()
        self.kvm.close()


# -- the platform's devices --------------------------------------------------------------
@dataclass(frozen=True)
class _PlatformDevice:
    """A legacy device every machine has, at fixed ports (and a fixed ISA IRQ)."""

    id: str
    kind: str
    cls: type  # the device class: its state_type and state_version
    base: int
    length: int
    gsi: int | None
    make: Callable[[_Assembly, Any], Device]  # (assembly, saved state or None)


def _serial(a: _Assembly, state: Any) -> Device:  # noqa: ANN401 (a decoded state record)
    assert a.devices is not None
    return Serial16550(a.console, a.devices.irq_line("serial0", COM1_IRQ), state)


PLATFORM = (
    _PlatformDevice(
        "serial0", "serial-16550a", Serial16550, COM1_BASE, UART_REGS, COM1_IRQ, _serial
    ),
    _PlatformDevice("post", "post-code", PostCode, POST_PORT, 1, None, lambda a, s: PostCode(s)),
    _PlatformDevice(
        "debug-exit",
        "debug-exit",
        DebugExit,
        DEBUG_EXIT_PORT,
        DEBUG_EXIT_LEN,
        None,
        lambda a, s: DebugExit(a.control.guest_exit),
    ),
    _PlatformDevice("pace", "pace", PaceClock, PACE_PORT, 1, None, lambda a, s: PaceClock(s)),
    _PlatformDevice("rtc", "cmos-rtc", CmosRtc, RTC_PORT, RTC_PORTS, None, lambda a, s: CmosRtc(s)),
    _PlatformDevice(
        "i8042",
        "i8042",
        I8042,
        I8042_DATA,
        I8042_PORTS,
        None,
        lambda a, s: I8042(a.control.guest_reset, s),
    ),
)
KINDS = {p.kind: p for p in PLATFORM}
BY_ID = {p.id: p for p in PLATFORM}


def _saved_state(saved: MachineState, device_id: str, cls: type) -> object:
    """The decoded saved state of device `device_id`, of class `cls`."""
    version: int = getattr(cls, "state_version")  # noqa: B009 (class attributes)
    state_type: type = getattr(cls, "state_type")  # noqa: B009
    record: DeviceRecord | None = saved.devices.get(device_id)
    if record is None:
        raise StreamFormatError(f"device section: no saved state for device {device_id!r}")
    if record.version > version:
        raise StreamFormatError(
            f"device section: {device_id} state version {record.version} is newer than this"
            f" kvmkit's ({version}): upgrade kvmkit"
        )
    if record.version < version:
        raise StreamFormatError(
            f"device section: {device_id} state version {record.version} is older than this"
            f" kvmkit reads ({version}): restore it with the kvmkit that took it"
        )
    return decode_device_state(record, state_type, device_id)


# -- road 1: boot -------------------------------------------------------------------------
def build_for_boot(
    resources: VmResources | MachineConfig, console: BinaryIO | None = None
) -> Machine:
    """A machine ready to `run()` the guest its resources name. `console`: a stream
    for the UART's output instead of the resources' console target."""
    if isinstance(resources, MachineConfig):
        resources = resources.resources()
    a = _Assembly()
    try:
        spec, boot = resources.machine, resources.boot
        resources.validate(max_vcpus=a.kvm.check_extension(Cap.MAX_VCPUS))
        if spec.hide != "off" and _wants_virtio(resources):
            raise ConfigError(
                "virtio devices read and write guest RAM wherever the driver puts buffers:"
                " they cannot be used with --hide-guest-memory"
            )
        image = boot.image() if isinstance(boot, ProgramBoot) else b""
        a.platform(spec.irqchip, spec.dirty_ring_bytes)
        a.memory = GuestMemory(
            a.vm,
            spec.memory_bytes,
            spec.memory_backend,
            hugepage_size=spec.hugepage_size,
            numa=spec.numa,
            prealloc=spec.prealloc,
            no_direct_map=spec.hide == "direct-map",
        )
        a.console = open_console(resources.console.target, console)
        a.add_platform_devices(None)
        a.add_virtio_devices(resources)
        for i in range(spec.vcpus):
            a.vcpus.append(a.vm.create_vcpu(i))
        if isinstance(boot, LinuxBoot):
            root = next((i for i, d in enumerate(resources.drives) if d.root), None)
            record = _boot_linux(a, boot, spec.vcpus, spec.irqchip, root)
        else:
            record = _boot_program(a, boot, spec.vcpus, spec.irqchip, image)
        if spec.hide != "off":
            _hide_guest_memory(a)
        _dirty_rings(a, spec.dirty_ring_bytes)
        description = _describe(a, spec.vcpus, spec.hugepage_size, spec.irqchip, record)
        if isinstance(boot, LinuxBoot):
            description = replace(description, unclaimed_io="ignore")
        return a.machine(description, resources)
    except BaseException:
        a.close()
        raise


def _boot_program(
    a: _Assembly, boot: ProgramBoot, nr_vcpus: int, irqchip: bool, image: bytes
) -> BootRecord:
    """Load a guest program and set every vCPU up to enter it."""
    assert a.memory is not None
    if boot.cpu_mode == "long":
        flags = BOOT_FLAG_PVM_HOST if a.kvm.is_pvm else 0
        a.plan = load_long_mode(a.memory, image, boot.load_addr, nr_vcpus, boot.guest_arg, flags)
    else:
        a.plan = load_real_mode(a.memory, image, boot.load_addr)
    supported = a.kvm.supported_cpuid()
    for vcpu in a.vcpus:
        setup_vcpu(vcpu, a.plan, supported)
        if irqchip and vcpu.index > 0:  # an AP would wait for INIT/SIPI: start it as well
            vcpu.set_mp_state(KVM_MP_STATE_RUNNABLE)
    kind = "program" if boot.program is not None else "file"
    return BootRecord(kind, boot.guest, boot.guest_arg, boot.cpu_mode)  # type: ignore[arg-type]


def _boot_linux(
    a: _Assembly, boot: LinuxBoot, nr_vcpus: int, irqchip: bool, root_drive: int | None
) -> BootRecord:
    """Load a Linux kernel; the boot vCPU enters it, the others wait for its SIPI.
    `root_drive`: the index of the drive that is the root device, if any."""
    from kvmkit.arch.x86.guest_cpuid import PVM_HIDDEN  # Linux only: not at import
    from kvmkit.machine import linux_boot

    assert a.memory is not None and a.devices is not None and a.console is not None
    try:
        tsc_khz: int | None = a.vcpus[0].get_tsc_khz()
    except KvmError:
        tsc_khz = None
    irqs = sorted(p.gsi for p in a.devices.placements.values() if p.gsi is not None and p.gsi > 15)
    supported = a.kvm.supported_cpuid()
    hide = PVM_HIDDEN if a.kvm.is_pvm else ()
    extra = linux_boot.guest_cpuid_params(a.vcpus[0], supported, hide)
    if extra:
        a.notes.append(
            f"this host's KVM answers CPUID itself, so kvmkit asked the guest on its command"
            f" line to leave {', '.join(hide)} alone ({' '.join(extra)})"
        )
    root = None if root_drive is None else f"blk{root_drive}"
    if a.virtio:
        extra = extra + _virtio().cmdline_params(list(a.devices.placements.values()), root)
    plan = linux_boot.load(a.memory, boot, nr_vcpus, tsc_khz, irqs, extra)
    for vcpu in a.vcpus:
        linux_boot.setup_vcpu(vcpu, plan, supported, nr_vcpus, a.kvm.is_pvm, irqchip, a.memory)
    _watch_kernel(a)
    a.notes.extend(plan.notes)
    cmdline = linux_boot.compose_cmdline(boot.cmdline, tsc_khz, extra)
    return BootRecord("linux", boot.kernel, 0, "long", cmdline)


def _watch_kernel(a: _Assembly) -> None:
    """Read a Linux guest's console for how it ends (panic, power down, restart)."""
    assert a.console is not None
    kernel = KernelConsole()
    kernel.on_panic_end = a.control.kernel_panicked
    a.control.kernel = kernel
    a.console.line_watchers.append(kernel.line)


def _dirty_rings(a: _Assembly, ring_bytes: int) -> None:
    if ring_bytes:
        assert a.memory is not None
        a.dirty_rings = DirtyRings(a.vm, {r.slot: r.offset for r in a.memory.regions})


def _hide_guest_memory(a: _Assembly) -> None:
    """Unmap guest RAM from this process, keeping only windows devices declare."""
    from kvmkit.hostcheck.probes import guest_memfd_runs_unmapped

    assert a.memory is not None and a.devices is not None
    probe = guest_memfd_runs_unmapped()
    if not probe.ok:
        why = "; on a PVM host KVM reaches guest memory through the host mapping"
        raise KvmUnsupportedError(
            "--hide-guest-memory",
            "this host's KVM cannot run a guest from guest_memfd without a host mapping"
            f" (measured: {probe.detail}){why if a.kvm.is_pvm else ''}",
        )
    keep = []
    for device in a.devices.devices.values():
        declared = getattr(device, "shared_windows", None)
        for gpa, size in declared() if declared else []:
            keep.append((gpa, size, device.name))
    a.memory.hide(keep)


def _describe(
    a: _Assembly, vcpus: int, hugepage_size: int, irqchip: bool, boot: BootRecord
) -> MachineDescription:
    assert a.memory is not None and a.devices is not None
    memory = a.memory
    devices = []
    for p in a.devices.placements.values():
        if p.id in a.virtio:
            kind, config = a.virtio[p.id]
            devices.append(
                DevicePlacementRecord(p.id, kind, p.bus, p.base, p.length, p.gsi, encode(config))
            )
        else:
            devices.append(
                DevicePlacementRecord(p.id, BY_ID[p.id].kind, p.bus, p.base, p.length, p.gsi)
            )
    return MachineDescription(
        model=MODEL_VERSION,
        memory_bytes=memory.size_bytes,
        vcpus=vcpus,
        backend=memory.backend_name,  # type: ignore[arg-type]
        hugepage_size=hugepage_size,
        boot=boot,
        irqchip=irqchip,
        pit=irqchip,
        regions=[RegionRecord(r.slot, r.gpa, r.size, r.offset) for r in memory.regions],
        devices=devices,
        summary=(
            f"{vcpus} vCPU, {format_size(memory.size_bytes)} {memory.backend_name},"
            f" guest {boot.guest}"
        ),
    )


# -- road 2: from a saved machine ------------------------------------------------------------
def build_from_saved(source: SavedSource, options: RestoreOptions | None = None) -> Machine:
    """A machine that continues `source`'s saved state when `run()`. The source fills
    guest memory and yields the rest of the state once the memory exists."""
    from kvmkit.snapshot import cpu_state  # the restore road only: a boot skips them
    from kvmkit.snapshot.machine_state import check_host, check_layout

    options = options or RestoreOptions()
    d = source.description
    backend = options.memory_backend or d.backend
    a = _Assembly()
    try:
        notes = check_host(source.header, a.kvm, backend, source.what)
        if d.vcpus > a.kvm.check_extension(Cap.MAX_VCPUS):
            raise ConfigError(
                f"{source.what} has {d.vcpus} vCPUs, more than this host's KVM allows"
            )
        _check_devices(d)  # before any memory arrives: a bad device or override costs
        _check_overrides(d, options)  # nothing then (a migration's whole pre-copy, later)
        a.platform(d.irqchip, 0)
        a.memory = GuestMemory(a.vm, d.memory_bytes, backend, hugepage_size=d.hugepage_size)
        check_layout(d, a.memory)
        saved = source.load(a.memory)
        a.console = open_console(options.console, options.console_stream)
        if d.boot.kind == "linux":
            _watch_kernel(a)
        a.add_platform_devices(saved)
        a.add_saved_virtio_devices(d, saved, options)
        for i in range(d.vcpus):
            a.vcpus.append(a.vm.create_vcpu(i))
        cpu_state.apply_vm(a.vm, saved.vm, "VM state")
        for i, (vcpu, state) in enumerate(zip(a.vcpus, saved.vcpus, strict=True)):
            cpu_state.apply_vcpu(vcpu, state, f"vCPU {i} state")
        machine = a.machine(_in_use(d, a.virtio), None)
        machine.restore_notes = notes
        return machine
    except BaseException:
        a.close()
        raise


def _check_overrides(d: MachineDescription, o: RestoreOptions) -> None:
    """Each drive's file must open, and replacement files, taps and sockets must name
    devices the saved machine has."""
    if o.drive_paths or o.net_taps or o.vsock_uds or any(r.kind == "virtio-blk" for r in d.devices):
        _virtio().check_host_overrides(
            [(r.kind, r.config) for r in d.devices],
            o.drive_paths or {},
            o.net_taps or {},
            o.vsock_uds,
        )


def _in_use(d: MachineDescription, virtio: dict[str, tuple[str, object]]) -> MachineDescription:
    """The saved description with each virtio device's configuration as it is now
    (a replacement disk, another tap): what this machine's own snapshots must name."""
    devices = [
        replace(r, config=encode(virtio[r.id][1])) if r.id in virtio else r for r in d.devices
    ]
    return replace(d, devices=devices)


def _check_devices(d: MachineDescription) -> None:
    """The saved machine's devices must be this kvmkit's platform, at the same places,
    and virtio devices of kinds this kvmkit knows, each in an MMIO slot with an IRQ."""
    for record in d.devices:
        if record.kind.startswith("virtio-") and record.kind in _virtio().KINDS:
            try:
                _virtio().check_placement(
                    record.id, record.kind, record.bus, record.length, record.gsi
                )
            except ConfigError as e:
                raise StreamFormatError(f"machine section: {e}") from None
            continue
        p = KINDS.get(record.kind)
        if p is None:
            raise StreamFormatError(
                f"machine section: device {record.id!r} is of kind {record.kind!r}, which this"
                " kvmkit does not know: restore it with the kvmkit that took it"
            )
        if (record.id, record.bus, record.base, record.length, record.gsi) != (
            p.id,
            "pio",
            p.base,
            p.length,
            p.gsi,
        ):
            raise StreamFormatError(
                f"machine section: device {record.id!r} sits at {record.bus} {record.base:#x}"
                f"+{record.length:#x} (IRQ {record.gsi}), not where this kvmkit puts it"
            )
    missing = {p.id for p in PLATFORM} - {r.id for r in d.devices}
    if missing:
        raise StreamFormatError(
            f"machine section: the saved machine lacks device(s) {', '.join(sorted(missing))}"
        )
