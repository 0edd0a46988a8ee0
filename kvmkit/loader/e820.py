"""The e820 memory map a Linux guest gets (in the zero page or as the PVH memmap).

Types are the ACPI address range types Linux and the PVH ABI share. RAM ranges come
from the caller (kvmkit's layout: RAM at [0, min(size, 3 GiB)) and from 4 GiB up, the
1 GiB hole between left for MMIO and not listed). [0x9fc00, 0x100000) is always
reserved (EBDA, VGA window, BIOS area: the VMM puts the MP table at 0x9fc00), as is
every range the caller passes; reserved ranges are cut out of RAM.
"""

from collections.abc import Iterable, Sequence
from typing import NamedTuple

from kvmkit.errors import ConfigError
from kvmkit.loader.addresses import LEGACY_RESERVED

E820_RAM = 1
E820_RESERVED = 2
E820_ACPI = 3
E820_NVS = 4
E820_UNUSABLE = 5
E820_PMEM = 7
E820_MAX_ENTRIES = 128  # E820_MAX_ENTRIES_ZEROPAGE
ADDRESS_LIMIT = 1 << 64


class E820Entry(NamedTuple):
    addr: int
    size: int
    type: int

    @property
    def end(self) -> int:
        return self.addr + self.size


def check_ranges(what: str, ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """`ranges` as a list of [start, end) pairs, each one checked."""
    out = []
    for start, end in ranges:
        if not 0 <= start < end <= ADDRESS_LIMIT:
            raise ConfigError(
                f"{what} range {start:#x}-{end:#x} is empty or outside the 64-bit address space:"
                " give [start, end) with start < end"
            )
        out.append((start, end))
    return out


def merge_ranges(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, with overlapping and touching ranges joined."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def subtract_ranges(
    ranges: Sequence[tuple[int, int]], holes: Sequence[tuple[int, int]]
) -> list[tuple[int, int]]:
    """The parts of `ranges` outside every range in `holes` (both lists merged)."""
    out = []
    for start, end in merge_ranges(ranges):
        pos = start
        for h_start, h_end in merge_ranges(holes):
            if h_end <= pos or h_start >= end:
                continue
            if h_start > pos:
                out.append((pos, h_start))
            pos = max(pos, h_end)
        if pos < end:
            out.append((pos, end))
    return out


def build_e820(
    ram: Iterable[tuple[int, int]], reserved: Iterable[tuple[int, int]] = ()
) -> list[E820Entry]:
    """The map for RAM ranges `ram` and extra reserved ranges `reserved`, all [start, end):
    sorted by address, at most 128 entries."""
    ram_ranges = check_ranges("RAM", ram)
    holes = merge_ranges([LEGACY_RESERVED, *check_ranges("reserved", reserved)])
    entries = [E820Entry(s, e - s, E820_RAM) for s, e in subtract_ranges(ram_ranges, holes)]
    entries += [E820Entry(s, e - s, E820_RESERVED) for s, e in holes]
    entries.sort()
    if len(entries) > E820_MAX_ENTRIES:
        raise ConfigError(
            f"the memory map needs {len(entries)} e820 entries; Linux takes {E820_MAX_ENTRIES}"
            " from the boot loader: pass fewer reserved ranges (join neighbouring ones)"
        )
    return entries
