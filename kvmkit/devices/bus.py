"""PIO and MMIO buses: address ranges mapped to devices, overlaps refused."""

import bisect
from dataclasses import dataclass
from typing import Any, Protocol

from kvmkit.errors import KvmkitError


class Device(Protocol):
    """A bus client. `offset` is relative to the start of the range it was added at.

    `name` is the device's id in its machine (`serial0`, `blk0`). A device that reads
    or writes guest RAM itself (DMA, virtqueues) also defines
    `shared_windows() -> list[tuple[int, int]]`: the (gpa, size) ranges it needs
    mapped in the host when guest memory is hidden. Keep them as small as possible.

    Every device declares its state for snapshots and migration: `state_type` (a
    dataclass, decoded with kvmkit.records), `state_version` (raised when the meaning
    of the state changes) and `save_state()` returning a `state_type` record. A device
    is rebuilt from its configuration plus such a record (its constructor takes
    `state=`), never poked into after construction.
    """

    @property
    def name(self) -> str: ...

    @property
    def state_version(self) -> int: ...

    @property
    def state_type(self) -> type: ...

    def read(self, offset: int, size: int) -> int: ...

    def write(self, offset: int, size: int, value: int) -> None: ...

    def save_state(self) -> Any: ...  # noqa: ANN401 (a `state_type` record)


class BusError(KvmkitError):
    pass


@dataclass(frozen=True)
class Mapping:
    base: int
    length: int
    device: Device

    @property
    def end(self) -> int:
        return self.base + self.length


class Bus:
    """Non-overlapping [base, base+length) ranges, each owned by one device."""

    def __init__(self, name: str, limit: int) -> None:
        self.name = name
        self.limit = limit
        self._bases: list[int] = []
        self._maps: list[Mapping] = []

    def add(self, base: int, length: int, device: Device) -> None:
        if length <= 0 or base < 0 or base + length > self.limit:
            raise BusError(
                f"{device.name}: {self.name} range {base:#x}+{length:#x} is outside"
                f" 0x0-{self.limit:#x}"
            )
        i = bisect.bisect_left(self._bases, base)
        for neighbour in self._maps[max(i - 1, 0) : i + 1]:
            if base < neighbour.end and neighbour.base < base + length:
                raise BusError(
                    f"{device.name}: {self.name} range {base:#x}-{base + length - 1:#x} overlaps"
                    f" {neighbour.device.name} at {neighbour.base:#x}-{neighbour.end - 1:#x}"
                )
        self._bases.insert(i, base)
        self._maps.insert(i, Mapping(base, length, device))

    def remove(self, base: int) -> None:
        i = bisect.bisect_left(self._bases, base)
        if i == len(self._bases) or self._bases[i] != base:
            raise BusError(f"nothing is mapped at {self.name} {base:#x}")
        del self._bases[i]
        del self._maps[i]

    def find(self, addr: int, size: int = 1) -> Mapping | None:
        """The mapping that wholly contains [addr, addr+size), if any."""
        i = bisect.bisect_right(self._bases, addr) - 1
        if i < 0:
            return None
        m = self._maps[i]
        return m if addr + size <= m.end else None

    def mappings(self) -> list[Mapping]:
        return list(self._maps)


def pio_bus() -> Bus:
    return Bus("port", 0x10000)


def mmio_bus() -> Bus:
    return Bus("MMIO", 1 << 52)
