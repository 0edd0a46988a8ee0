"""The whole-machine state model shared by snapshots and migration.

A stream holds, in order: the header (who wrote it, on what host, which KVM
capabilities the state depends on), the MACHINE section (configuration and memory
layout), the VM section, one VCPU section per vCPU, the DEVICES section, the memory
index and memory chunks, then END.
"""

import datetime
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from kvmkit import __version__
from kvmkit.arch.x86.host_cpu import host_cpu
from kvmkit.devices.bus import Device
from kvmkit.kvm import Kvm, KvmUnsupportedError, Vcpu, Vm
from kvmkit.kvm.system import kvm_backend
from kvmkit.memory import GuestMemory
from kvmkit.records import encode
from kvmkit.snapshot import cpu_state
from kvmkit.snapshot.format import (
    DEVICES,
    END,
    MACHINE,
    MEMORY,
    VCPU,
    VM,
    StreamFormatError,
    StreamReader,
    StreamWriter,
    check_header,
    pack_items,
    pack_json,
    unpack_items,
    unpack_json,
)
from kvmkit.snapshot.memory_image import Extent, chunked, index_limit, pack_index, unpack_index
from kvmkit.snapshot.model import (
    DeviceRecord,
    MachineDescription,
    MachineState,
    decode_description,
    decode_devices,
)
from kvmkit.uapi.caps import Cap

# Capabilities whose state a stream carries, by the state item that needs them.
ITEM_CAPS = {
    "xsave": "XSAVE",
    "xcrs": "XCRS",
    "events": "VCPU_EVENTS",
    "mp_state": "MP_STATE",
    "debugregs": "DEBUGREGS",
    "clock": "ADJUST_CLOCK",
    "lapic": "IRQCHIP",
    "pic_master": "IRQCHIP",
    "pic_slave": "IRQCHIP",
    "ioapic": "IRQCHIP",
    "pit2": "PIT_STATE2",
}
GMEM_CAPS = ("USER_MEMORY2", "GUEST_MEMFD", "GUEST_MEMFD_FLAGS")
IRQCHIP_ITEMS = ("lapic", *cpu_state.IRQCHIPS)  # captured with the in-kernel irqchip


class Capturable(Protocol):
    """What a machine offers to be saved (kvmkit.machine.Machine is one)."""

    kvm: Kvm | None
    vm: Vm | None
    memory: GuestMemory | None
    vcpus: list[Vcpu]
    description: MachineDescription

    @property
    def devices(self) -> dict[str, Device]: ...


@dataclass
class SavedMachine(MachineState):
    """A whole stream's state but the memory contents, with the memory index."""

    memory_index: list[Extent] = field(default_factory=list)


@dataclass
class WriteStats:
    memory_bytes: int = 0
    chunks: int = 0
    method: str = ""


ProgressFn = Callable[[int, int], None]


# -- writing ----------------------------------------------------------------------------
def header_for(
    machine: Capturable, kind: str, description: MachineDescription, items: Iterable[str]
) -> dict[str, Any]:
    """The stream header; `items` are the names of the state items the stream holds,
    whose capabilities a restoring host must have."""
    assert machine.kvm is not None and machine.memory is not None
    caps = {ITEM_CAPS[i] for i in items if i in ITEM_CAPS}
    if machine.memory.backend_name == "guest_memfd":
        caps.update(GMEM_CAPS)
    return {
        "kind": kind,
        "kvmkit_version": __version__,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host_cpu": host_cpu().to_dict(),
        "kernel": os.uname().release,
        "kvm_backend": kvm_backend(),
        "requires": {name: machine.kvm.check_extension(Cap[name]) for name in sorted(caps)},
        "summary": description.summary,
    }


@dataclass
class CapturedState:
    """A stopped machine's KVM and device state (not its memory)."""

    description: MachineDescription
    vm: dict[str, bytes]
    vcpus: list[dict[str, bytes]]
    devices: dict[str, DeviceRecord]

    @property
    def items(self) -> set[str]:
        return set(self.vm) | {name for v in self.vcpus for name in v}


def items_to_capture(machine: Capturable, description: MachineDescription) -> set[str]:
    """The state items that need a capability (ITEM_CAPS) which `capture_state` will
    hold for this machine, known while the guest still runs (a migration writes its
    header then): what the host's capabilities offer (see cpu_state.capture_vcpu and
    capture_vm), and the irqchip's and the PIT's where the machine has them."""
    assert machine.vm is not None
    on_cap = set(ITEM_CAPS) - set(IRQCHIP_ITEMS) - {"pit2"}
    items = {i for i in on_cap if machine.vm.check_extension(Cap[ITEM_CAPS[i]])}
    if description.irqchip:
        items.update(IRQCHIP_ITEMS)
    if description.pit:
        items.add("pit2")
    return items


def capture_state(machine: Capturable) -> CapturedState:
    """Read VM, vCPU and device state; every vCPU must be out of KVM_RUN."""
    assert machine.vm is not None and machine.kvm is not None
    description = machine.description
    irqchip, pit = description.irqchip, description.pit
    msrs = cpu_state.readable_msrs(machine.vcpus[0], machine.kvm.msr_index_list())
    vcpus = [cpu_state.capture_vcpu(v, msrs, irqchip) for v in machine.vcpus]
    vm_state = cpu_state.capture_vm(machine.vm, irqchip, pit)
    kinds = {d.id: d.kind for d in description.devices}
    devices = {
        name: DeviceRecord(kinds.get(name, name), dev.state_version, encode(dev.save_state()))
        for name, dev in machine.devices.items()
    }
    return CapturedState(description, vm_state, vcpus, devices)


def write_state(writer: StreamWriter, state: CapturedState) -> None:
    """The VM, VCPU (one per vCPU) and DEVICES sections."""
    writer.write_section(VM, [pack_items(state.vm)])
    for v in state.vcpus:
        writer.write_section(VCPU, [pack_items(v)])
    writer.write_section(DEVICES, [pack_json(encode(state.devices))])


def write_machine(
    writer: StreamWriter,
    machine: Capturable,
    kind: str = "snapshot",
    progress: ProgressFn | None = None,
) -> WriteStats:
    """Write a stopped machine (every vCPU out of KVM_RUN, no exit pending)."""
    assert machine.memory is not None
    state = capture_state(machine)
    extents, method = machine.memory.populated_extents()
    chunks = chunked(extents)

    writer.write_header(header_for(machine, kind, state.description, state.items))
    writer.write_section(MACHINE, [pack_json(encode(state.description))])
    write_state(writer, state)
    writer.write_section(MEMORY, [pack_index(chunks)])
    total = sum(c.length for c in chunks)
    done = 0
    for c in chunks:
        writer.write_section(MEMORY, [machine.memory.file_view(c.offset, c.length)], compress=True)
        done += c.length
        if progress is not None:
            progress(done, total)
    writer.end()
    return WriteStats(memory_bytes=total, chunks=len(chunks), method=method)


# -- reading ----------------------------------------------------------------------------
def expect_section(
    reader: StreamReader, tag: bytes, what: str, limit: int | None = None
) -> memoryview:
    """The next section's payload, which must be of type `tag` (at most `limit` bytes,
    when given instead of the type's limit)."""
    head = reader.next_section(limit)
    if head.tag != tag:
        raise StreamFormatError(f"{reader.what}: {head.label}: expected the {what} section here")
    return reader.read_payload(head)


def read_machine_description(reader: StreamReader) -> MachineDescription:
    payload = expect_section(reader, MACHINE, "machine description")
    return decode_description(unpack_json(payload, "machine section"))


def read_state(
    reader: StreamReader, header: dict[str, Any], description: MachineDescription
) -> MachineState:
    """The VM, VCPU and DEVICES sections, verified and decoded."""
    vm = unpack_items(expect_section(reader, VM, "VM state"), "VM section")
    vcpus = []
    for i in range(description.vcpus):
        vcpus.append(
            unpack_items(expect_section(reader, VCPU, f"vCPU {i} state"), f"vCPU {i} section")
        )
    devices = decode_devices(
        unpack_json(expect_section(reader, DEVICES, "device state"), "device section")
    )
    return MachineState(header, description, vm, vcpus, devices)


def read_machine(reader: StreamReader) -> SavedMachine:
    """Read and verify everything up to the memory chunks."""
    header = reader.read_header()
    description = read_machine_description(reader)
    state = read_state(reader, header, description)
    index_payload = expect_section(
        reader, MEMORY, "memory index", index_limit(description.memory_bytes)
    )
    index = unpack_index(index_payload, description.memory_bytes, f"{reader.what}: memory index")
    return SavedMachine(
        header, description, state.vm, state.vcpus, state.devices, memory_index=index
    )


def read_memory(
    reader: StreamReader,
    memory: GuestMemory,
    index: list[Extent],
    progress: ProgressFn | None = None,
) -> int:
    """Read every memory chunk straight into guest RAM, then the end marker. Each
    chunk is checksummed on the reader's helper thread while the next is read; every
    one is verified before this returns (and none is still being read when it
    raises)."""
    total = sum(c.length for c in index)
    done = 0
    try:
        for i, chunk in enumerate(index):
            head = reader.next_section()
            if head.tag != MEMORY or head.raw_bytes != chunk.length:
                raise StreamFormatError(
                    f"{reader.what}: {head.label}: expected memory chunk {i} of {len(index)}"
                    f" ({chunk.length} bytes)"
                )
            payload = reader.open_payload(head)
            payload.readinto(memory.file_view(chunk.offset, chunk.length))
            payload.finish(wait=False)
            done += chunk.length
            if progress is not None:
                progress(done, total)
        expect_section(reader, END, "end marker")
    except BaseException:
        reader.close()  # the helper may still checksum guest RAM the caller unmaps next
        raise
    return total


# -- host compatibility -------------------------------------------------------------------
def check_host(header: dict[str, Any], kvm: Kvm, backend: str, what: str) -> list[str]:
    """Refuse a stream this host cannot run; return warnings worth printing."""
    typed = check_header(header, f"{what}: header")
    saved_cpu = typed.host_cpu
    here = host_cpu()
    if saved_cpu.arch != here.arch:
        raise StreamFormatError(
            f"{what} was taken on {saved_cpu.arch!r}; this host is {here.arch!r}: a"
            " snapshot restores only on the same architecture"
        )
    if saved_cpu.vendor != here.vendor:
        raise StreamFormatError(
            f"{what} was taken on a {saved_cpu.vendor} CPU; this host's is {here.vendor}:"
            " the saved CPU state does not carry across vendors"
        )
    warnings = []
    if (saved_cpu.family, saved_cpu.model) != (here.family, here.model):
        warnings.append(
            f"taken on CPU family {saved_cpu.family} model {saved_cpu.model};"
            f" this is family {here.family} model {here.model}: the guest keeps its saved CPUID"
        )
    for name, value in typed.requires.items():
        if name in GMEM_CAPS and backend != "guest_memfd":
            continue
        try:
            cap = Cap[name]
        except KeyError:
            raise KvmUnsupportedError(
                f"restoring {what}", f"it needs KVM_CAP_{name}, which this kvmkit does not know"
            ) from None
        have = kvm.check_extension(cap)
        short = (have & value) != value if name == "GUEST_MEMFD_FLAGS" else not have
        if short:
            raise KvmUnsupportedError(
                f"restoring {what}",
                f"this host lacks KVM_CAP_{name} (saved host: {value:#x}, here: {have:#x}),"
                " which the saved state needs",
            )
    return warnings


def check_layout(description: MachineDescription, memory: GuestMemory) -> None:
    """Refuse a snapshot whose guest-physical layout differs from what this kvmkit builds."""
    saved = [[r.slot, r.gpa, r.size, r.offset] for r in description.regions]
    here = [[r.slot, r.gpa, r.size, r.offset] for r in memory.regions]
    if saved != here:
        raise StreamFormatError(
            f"machine section: the saved memory layout {saved} differs from the one this kvmkit"
            f" builds for {memory.size_bytes} bytes ({here}): restore with the kvmkit version"
            f" that took it"
        )
