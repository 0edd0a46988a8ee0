"""Hand-made state streams for the adversarial tests and the fuzz targets: heads and
payloads with whatever lengths, flags and content a test wants, their checksums made
right (or not), so a parser is reached past its CRC checks."""

import io
import json
import struct
import zlib
from typing import Any

from kvmkit.records import encode
from kvmkit.snapshot.format import (
    DEVICES,
    END,
    MACHINE,
    MAGIC,
    MEMORY,
    VCPU,
    VM,
    StreamWriter,
    pack_items,
    pack_json,
)
from kvmkit.snapshot.memory_image import Extent, pack_index
from kvmkit.snapshot.model import (
    MODEL_VERSION,
    BootRecord,
    DevicePlacementRecord,
    MachineDescription,
    RegionRecord,
)

PAGE = 4096


def crc(data: bytes) -> bytes:
    return struct.pack("<I", zlib.crc32(data))


def prelude(header: dict[str, Any] | bytes, version: int = 1) -> bytes:
    """Magic, version, header length, header, CRC: a correct prelude for any body."""
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    fixed = struct.pack("<8sII", MAGIC, version, len(body))
    return fixed + body + struct.pack("<I", zlib.crc32(body, zlib.crc32(fixed[8:])))


def head(
    tag: bytes, stored: int, raw: int | None = None, flags: int = 0, reserved: int = 0
) -> bytes:
    """A section head claiming anything, with its CRC right."""
    fields = struct.pack("<4sHHQQ", tag, flags, reserved, stored, stored if raw is None else raw)
    return fields + crc(fields)


def section(tag: bytes, payload: bytes, flags: int = 0, raw: int | None = None) -> bytes:
    return (
        head(tag, len(payload), len(payload) if raw is None else raw, flags)
        + payload
        + crc(payload)
    )


class Stream:
    """A stream built section by section; `end()` adds a correct end marker."""

    def __init__(self, header: dict[str, Any] | bytes | None = None) -> None:
        self.data = bytearray(prelude({"kind": "test"} if header is None else header))
        self.count = 0

    def add(self, tag: bytes, payload: bytes, flags: int = 0, raw: int | None = None) -> "Stream":
        self.data += section(tag, payload, flags, raw)
        self.count += 1
        return self

    def add_bytes(self, data: bytes, sections: int = 1) -> "Stream":
        self.data += data
        self.count += sections
        return self

    def end(self) -> bytes:
        self.add(END, struct.pack("<IQ", self.count, len(self.data)))
        return bytes(self.data)


HEADER: dict[str, Any] = {
    "kind": "snapshot",
    "kvmkit_version": "0.1.0",
    "created": "2025-01-01T00:00:00+00:00",
    "host_cpu": {
        "arch": "x86_64",
        "vendor": "AuthenticAMD",
        "family": 25,
        "model": 1,
        "model_name": "a CPU",
    },
    "kernel": "6.18.0",
    "kvm_backend": "pvm",
    "requires": {"XSAVE": 1, "VCPU_EVENTS": 1},
    "summary": "1 vCPU, 1 MiB memfd, guest counter",
}


def machine_description(vcpus: int = 1, memory_bytes: int = 1 << 20) -> dict[str, Any]:
    """A typed machine description (kvmkit/snapshot/model.py) as its section holds it."""
    return encode(
        MachineDescription(
            model=MODEL_VERSION,
            memory_bytes=memory_bytes,
            vcpus=vcpus,
            backend="memfd",
            hugepage_size=2 << 20,
            boot=BootRecord("program", "counter", 0, "long"),
            irqchip=False,
            pit=False,
            regions=[RegionRecord(0, 0, memory_bytes, 0)],
            devices=[DevicePlacementRecord("post", "post-code", "pio", 0x80, 1)],
            summary=f"{vcpus} vCPU, {memory_bytes >> 20} MiB memfd, guest counter",
        )
    )


def snapshot_bytes(
    vcpus: int = 1,
    memory_bytes: int = 1 << 20,
    chunks: tuple[tuple[int, int], ...] = ((0, 2 * PAGE), (64 * PAGE, PAGE)),
    compress_level: int | None = None,
    header: dict[str, Any] | None = None,
    machine: dict[str, Any] | None = None,
) -> bytes:
    """A complete, valid snapshot file of made-up state, as kvmkit writes it."""
    out = io.BytesIO()
    writer = StreamWriter(out, compress_level)
    writer.write_header(HEADER if header is None else header)
    writer.write_section(MACHINE, [pack_json(machine or machine_description(vcpus, memory_bytes))])
    writer.write_section(VM, [pack_items({"clock": bytes(48)})])
    for i in range(vcpus):
        writer.write_section(VCPU, [pack_items({"regs": bytes([i]) * 144, "msrs": b""})])
    devices = {"post": {"kind": "post-code", "version": 1, "state": {"last": 0}}}
    writer.write_section(DEVICES, [pack_json(devices)])
    writer.write_section(MEMORY, [pack_index([Extent(o, n) for o, n in chunks])])
    for offset, length in chunks:
        data = bytes((offset // PAGE + i) % 251 for i in range(256)) * (length // 256)
        writer.write_section(MEMORY, [data], compress=compress_level is not None)
    writer.end()
    return out.getvalue()


def sections_of(data: bytes) -> list[tuple[int, bytes, int, int]]:
    """(offset, tag, stored, raw) of each section of a well-formed stream."""
    (length,) = struct.unpack_from("<I", data, 12)
    at = 16 + length + 4
    out = []
    while at + 28 <= len(data):
        tag, _flags, _res, stored, raw = struct.unpack_from("<4sHHQQ", data, at)
        out.append((at, tag, stored, raw))
        at += 28 + stored + 4
    return out


def zstd_bomb(size: int) -> bytes:
    """A zstd frame of `size` zero bytes that says so in its header, made without
    holding `size` bytes."""
    import zstandard

    z = zstandard.ZstdCompressor().compressobj(size=size)
    zeros = bytes(1 << 20)
    out = [z.compress(zeros[: min(len(zeros), size - at)]) for at in range(0, size, len(zeros))]
    return b"".join(out) + z.flush()
