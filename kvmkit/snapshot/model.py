"""The typed machine state model shared by snapshots and migration.

- `MachineDescription` (the MACHINE section): what to build so the saved state fits:
  vCPUs, memory size, backend and layout, the boot source, the irqchip, and every
  device with its kind, configuration and placement.
- `DeviceRecord` (one entry of the DEVICES section, keyed by device id): the device's
  kind, state version and typed state.
- `MachineState`: everything but the memory contents, as a builder consumes it.

Each record is decoded with kvmkit.records, so a wrong type, a missing field or an
out-of-range value is a StreamFormatError naming the section and the field.
"""

from dataclasses import dataclass, field
from typing import Any, Literal

from kvmkit.memory.backend import BACKEND_NAMES
from kvmkit.memory.hugepages import HUGEPAGE_SIZES
from kvmkit.records import U32, U64, bounds, decode
from kvmkit.snapshot.format import StreamFormatError

MODEL_VERSION = 2  # of the MACHINE section's content; kvmkit 0.1 wrote 1 (untyped)
MAX_VCPUS = 1024
MAX_DEVICES = 64
BackendName = Literal["guest_memfd", "memfd", "hugetlb", "thp"]
assert set(BACKEND_NAMES) == {"guest_memfd", "memfd", "hugetlb", "thp"}


@dataclass(frozen=True)
class RegionRecord:
    """A memory slot: guest-physical range and offset in the backing file."""

    slot: int = field(metadata=bounds(0, 0x7FFF))
    gpa: int = field(metadata=bounds(*U64))
    size: int = field(metadata=bounds(1, 1 << 52))
    offset: int = field(metadata=bounds(0, 1 << 52))


@dataclass(frozen=True)
class BootRecord:
    """What the machine booted: a built-in guest program, a flat binary or Linux.
    A restored machine does not boot again; this is for the status and summary."""

    kind: Literal["program", "file", "linux"]
    guest: str = field(default="", metadata=bounds(0, 4096))
    guest_arg: int = field(default=0, metadata=bounds(*U64))
    mode: Literal["long", "real"] = "long"
    cmdline: str = field(default="", metadata=bounds(0, 1 << 16))


@dataclass(frozen=True)
class DevicePlacementRecord:
    """A device as the machine was built with it: id, kind, where, its interrupt and
    its configuration (a kind's own record, decoded when the device is rebuilt)."""

    id: str = field(metadata=bounds(1, 64))
    kind: str = field(metadata=bounds(1, 64))
    bus: Literal["pio", "mmio"]
    base: int = field(metadata=bounds(*U64))
    length: int = field(metadata=bounds(1, 1 << 32))
    gsi: int | None = field(default=None, metadata=bounds(0, 1023))
    config: dict[str, Any] = field(default_factory=dict, metadata=bounds(0, 64))


@dataclass(frozen=True)
class MachineDescription:
    model: int
    memory_bytes: int = field(metadata=bounds(1, 1 << 52))
    vcpus: int = field(metadata=bounds(1, MAX_VCPUS))
    backend: BackendName
    hugepage_size: int
    boot: BootRecord
    irqchip: bool
    pit: bool
    regions: list[RegionRecord] = field(metadata=bounds(1, 64))
    devices: list[DevicePlacementRecord] = field(metadata=bounds(0, MAX_DEVICES))
    unclaimed_io: Literal["crash", "ignore"] = "crash"
    summary: str = field(default="", metadata=bounds(0, 1024))

    def __post_init__(self) -> None:
        if self.model != MODEL_VERSION:
            raise ValueError(
                f"machine model {self.model} was written by another kvmkit version (this one"
                f" reads {MODEL_VERSION}): restore it with the kvmkit version that took it"
            )
        if self.hugepage_size not in HUGEPAGE_SIZES.values():
            raise ValueError(f"field 'hugepage_size': {self.hugepage_size} is not a hugepage size")
        ids = [d.id for d in self.devices]
        if len(set(ids)) != len(ids):
            raise ValueError("field 'devices': two devices share an id")

    def device(self, device_id: str) -> DevicePlacementRecord | None:
        return next((d for d in self.devices if d.id == device_id), None)


@dataclass(frozen=True)
class DeviceRecord:
    """One device's saved state: its `state` is the kind's state record as JSON data,
    decoded by the kind when the device is rebuilt."""

    kind: str = field(metadata=bounds(1, 64))
    version: int = field(metadata=bounds(*U32))
    state: dict[str, Any] = field(default_factory=dict, metadata=bounds(0, 256))


@dataclass
class MachineState:
    """A stream's state, except guest memory: what a builder needs to rebuild the
    machine. `vm` and `vcpus` hold raw uAPI structures by name (see cpu_state)."""

    header: dict[str, Any]
    description: MachineDescription
    vm: dict[str, bytes]
    vcpus: list[dict[str, bytes]]
    devices: dict[str, DeviceRecord]


def decode_description(value: object) -> MachineDescription:
    if isinstance(value, dict) and value.get("model", 1) != MODEL_VERSION:
        raise StreamFormatError(
            f"machine section: machine model {value.get('model', 1)!r} was written by another"
            f" kvmkit version (this one reads {MODEL_VERSION}): restore it with the kvmkit"
            " version that took it"
        )
    return decode(MachineDescription, value, "machine section", StreamFormatError)


def decode_devices(value: object) -> dict[str, DeviceRecord]:
    if not isinstance(value, dict):
        raise StreamFormatError("device section: must be an object keyed by device id")
    if len(value) > MAX_DEVICES:
        raise StreamFormatError(f"device section: {len(value)} devices, more than {MAX_DEVICES}")
    return {
        str(k)[:64]: decode(DeviceRecord, v, f"device section: {str(k)[:64]!r}", StreamFormatError)
        for k, v in value.items()
    }


def decode_device_state(record: DeviceRecord, state_type: type, where: str) -> Any:  # noqa: ANN401
    return decode(state_type, record.state, f"device section: {where}: state", StreamFormatError)
