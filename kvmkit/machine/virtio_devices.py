"""The virtio device kinds a machine can have, and how both builder roads add them.

A kind is one `VirtioKind`: its DevicePlacementRecord kind string, the device class
(a `VirtioMmioDevice` subclass: state_type, state_version), its configuration record
type, `configs(resources)` (the devices of that kind a VmResources asks for, as
(device id, configuration record) pairs, on the boot road) and `make(context,
config, state)` (the device, from its configuration and, on the saved road, its
decoded state). `KINDS` lists them; adding a kind is adding an entry there.

`add_virtio_device` places one device: an interrupt line (an irqfd GSI: from the
pool on boot, the saved one on restore), a 4 KiB MMIO slot (the next one on boot,
the saved base on restore) and one QueueNotify ioeventfd per queue (datamatch = the
queue index), each served on the event loop. `cmdline_params` gives the guest's
`virtio_mmio.device=4K@0xADDR:GSI` entries, in placement order.
"""

import functools
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from kvmkit.devices.irq import IrqLine
from kvmkit.devices.virtio.balloon import BalloonConfig, VirtioBalloon
from kvmkit.devices.virtio.blk import BlkConfig, VirtioBlk, open_backing
from kvmkit.devices.virtio.mmio import MMIO_SIZE, QUEUE_NOTIFY, VirtioMmioDevice
from kvmkit.devices.virtio.net import NetConfig, VirtioNet, derived_mac
from kvmkit.devices.virtio.rng import RngConfig, VirtioRng
from kvmkit.devices.virtio.vsock import VirtioVsock, VsockConfig
from kvmkit.errors import ConfigError
from kvmkit.machine.device_manager import DeviceManager, Placement
from kvmkit.machine.event_loop import EventLoop
from kvmkit.machine.resources import VmResources
from kvmkit.memory import GuestMemory


@dataclass(frozen=True)
class VirtioContext:
    """What a kind's `make` may use besides its configuration and state.

    `drive_paths`: drive id -> a backing file to use instead of the saved path (a
    restore or an incoming migration on another host). `events`: the machine's event
    loop (host fds: taps, vsock sockets). `net_taps`: interface id -> the tap to attach
    instead of the saved one; `vsock_uds`: the vsock socket path instead of the saved
    one (restore and migration overrides)."""

    memory: GuestMemory
    drive_paths: Mapping[str, str] = field(default_factory=dict)
    events: EventLoop | None = None
    net_taps: Mapping[str, str] = field(default_factory=dict)
    vsock_uds: str | None = None


@dataclass(frozen=True)
class VirtioKind:
    kind: str
    cls: type[VirtioMmioDevice]
    config_type: type
    configs: Callable[[VmResources], list[tuple[str, Any]]]
    make: Callable[..., VirtioMmioDevice]  # (name, context, irq, config, state | None)


def _drives(r: VmResources) -> list[tuple[str, Any]]:
    return [(f"blk{i}", BlkConfig.from_spec(d)) for i, d in enumerate(r.drives)]


def _make_blk(name: str, ctx: VirtioContext, irq: Any, config: BlkConfig, state: Any) -> VirtioBlk:  # noqa: ANN401
    path = os.path.abspath(ctx.drive_paths.get(config.drive_id, config.path))
    config = replace(config, path=path)  # the machine's description names the file in use
    return VirtioBlk(name, ctx.memory, irq, config, path, state)


def _entropy(r: VmResources) -> list[tuple[str, Any]]:
    return [("rng", RngConfig())] if r.entropy is not None else []


def _balloon(r: VmResources) -> list[tuple[str, Any]]:
    return [("balloon", BalloonConfig.from_spec(r.balloon))] if r.balloon is not None else []


def _nets(r: VmResources) -> list[tuple[str, Any]]:
    return [
        (f"net{i}", NetConfig(n.iface_id, n.tap, (n.mac or derived_mac(i)).lower()))
        for i, n in enumerate(r.nets)
    ]


def _make_net(
    name: str, ctx: VirtioContext, irq: IrqLine, config: NetConfig, state: Any
) -> VirtioNet:
    from kvmkit.devices.tap import Tap

    assert ctx.events is not None
    tap = ctx.net_taps.get(config.iface_id, config.tap)
    try:
        opened = Tap.open(tap)
    except ConfigError as e:
        if state is None:
            raise ConfigError(f"network interface {config.iface_id}: {e}") from None
        raise ConfigError(
            f"network interface {config.iface_id}: {e} (or attach another tap with"
            f" --net-tap {config.iface_id}=TAP)"
        ) from None
    config = replace(config, tap=tap)
    try:
        return VirtioNet(name, ctx.memory, irq, config, opened, ctx.events, state)
    except BaseException:
        opened.close()
        raise


def _vsocks(r: VmResources) -> list[tuple[str, Any]]:
    return [("vsock", VsockConfig(r.vsock.cid, r.vsock.uds))] if r.vsock is not None else []


def _make_vsock(
    name: str, ctx: VirtioContext, irq: IrqLine, config: VsockConfig, state: Any
) -> VirtioVsock:
    assert ctx.events is not None
    if ctx.vsock_uds is not None:
        config = replace(config, uds=ctx.vsock_uds)
    try:
        return VirtioVsock(name, ctx.memory, irq, config, ctx.events, state)
    except ConfigError as e:
        if state is None:
            raise
        raise ConfigError(
            f"{e} (or give the restored vsock another with --vsock-uds PATH)"
        ) from None


KINDS: dict[str, VirtioKind] = {
    k.kind: k
    for k in (
        VirtioKind("virtio-blk", VirtioBlk, BlkConfig, _drives, _make_blk),
        VirtioKind(
            "virtio-rng",
            VirtioRng,
            RngConfig,
            _entropy,
            lambda name, ctx, irq, config, state: VirtioRng(name, ctx.memory, irq, state),
        ),
        VirtioKind(
            "virtio-balloon",
            VirtioBalloon,
            BalloonConfig,
            _balloon,
            lambda name, ctx, irq, config, state: VirtioBalloon(
                name, ctx.memory, irq, config, state
            ),
        ),
        VirtioKind("virtio-net", VirtioNet, NetConfig, _nets, _make_net),
        VirtioKind("virtio-vsock", VirtioVsock, VsockConfig, _vsocks, _make_vsock),
    )
}


def add_virtio_device(
    devices: DeviceManager,
    events: EventLoop,
    device: VirtioMmioDevice,
    placement: Placement | None = None,
) -> int:
    """Put `device` on the MMIO bus with its doorbells; returns its MMIO base.
    `placement`: where a restored device was (its base and GSI are kept)."""
    device.defer = events.call_soon
    base = devices.add_mmio(
        device,
        MMIO_SIZE,
        gsi=device.irq.gsi,
        at=None if placement is None else placement.base,
    )
    for index in range(len(device.queues)):
        devices.ioeventfd(
            device.name,
            base + QUEUE_NOTIFY,
            4,
            functools.partial(device.notify, index),
            datamatch=index,
        )
    for fd, callback in device.host_readers():
        devices.add_reader(device.name, fd, callback)
    return base


def check_host_overrides(
    saved: list[tuple[str, Mapping[str, Any]]],
    drive_paths: Mapping[str, str],
    net_taps: Mapping[str, str],
    vsock_uds: str | None,
) -> None:
    """Every saved drive's file (or its replacement) must open, and the drives, taps
    and vsock socket given for a restore must name devices the saved machine has (a
    misspelt id would otherwise be ignored in silence, and a restored guest would write
    to the disk it was meant to leave alone)."""
    drives = [str(c.get("drive_id")) for kind, c in saved if kind == "virtio-blk"]
    for drive in drive_paths:
        if drive not in drives:
            has = ", ".join(drives) if drives else "none"
            raise ConfigError(
                f"a replacement file for drive {drive[:40]!r}: the saved machine has no such"
                f" drive (its drives: {has})"
            )
    ifaces = [str(c.get("iface_id")) for kind, c in saved if kind == "virtio-net"]
    for iface in net_taps:
        if iface not in ifaces:
            has = ", ".join(ifaces) if ifaces else "none"
            raise ConfigError(
                f"a tap for network interface {iface[:40]!r}: the saved machine has no such"
                f" interface (its interfaces: {has})"
            )
    if vsock_uds is not None and not any(kind == "virtio-vsock" for kind, _ in saved):
        raise ConfigError(
            "a vsock socket path was given, but the saved machine has no vsock device"
        )
    for kind, c in saved:  # each drive's file opens now, before any memory arrives
        if kind == "virtio-blk":
            drive_id = str(c.get("drive_id"))
            path = drive_paths.get(drive_id, str(c.get("path")))
            try:
                fd, _ = open_backing(drive_id, path, bool(c.get("read_only")))
            except ConfigError as e:
                raise ConfigError(
                    f"{e}; give the drive's file in its place with --drive-path {drive_id}=PATH"
                ) from None
            os.close(fd)


def check_placement(device_id: str, kind: str, bus: str, length: int, gsi: int | None) -> None:
    """A saved virtio device must be an MMIO slot with an interrupt line."""
    if bus != "mmio" or length != MMIO_SIZE or gsi is None:
        raise ConfigError(
            f"device {device_id!r} ({kind}) is saved at a {bus} range of {length:#x} bytes"
            f" with IRQ {gsi}: a virtio-mmio device has a {MMIO_SIZE:#x}-byte MMIO slot and"
            " an IRQ"
        )


def cmdline_params(placements: list[Placement], root: str | None) -> list[str]:
    """`virtio_mmio.device=` entries for the MMIO devices in `placements`, and
    `root=/dev/vdX` when `root` names the root drive's device id."""
    params = [
        f"virtio_mmio.device=4K@{p.base:#x}:{p.gsi}"
        for p in placements
        if p.bus == "mmio" and p.gsi is not None
    ]
    if root is not None:
        blks = [p.id for p in placements if p.bus == "mmio" and p.id.startswith("blk")]
        if root in blks:
            params.append(f"root=/dev/vd{chr(ord('a') + blks.index(root))}")
    return params
