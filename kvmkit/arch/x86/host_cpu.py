"""The host CPU's identity, as /proc/cpuinfo states it."""

import platform
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class HostCpu:
    arch: str
    vendor: str
    family: int
    model: int
    model_name: str

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def host_cpu(cpuinfo: str | None = None) -> HostCpu:
    text = cpuinfo if cpuinfo is not None else _read_cpuinfo()
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            break  # the first processor is enough
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return HostCpu(
        arch=platform.machine(),
        vendor=fields.get("vendor_id", "unknown"),
        family=int(fields.get("cpu family", "0") or 0),
        model=int(fields.get("model", "0") or 0),
        model_name=fields.get("model name", "unknown"),
    )


def _read_cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
