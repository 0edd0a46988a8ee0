"""Where guest RAM sits in the guest-physical address space.

RAM starts at 0. Above 3 GiB it is split around a 1 GiB hole below 4 GiB that is
left for MMIO (local APIC, IOAPIC, PCI windows), and the rest continues at 4 GiB.
"""

from dataclasses import dataclass

PAGE_SIZE = 4096
MIB = 1 << 20
GIB = 1 << 30
MMIO_GAP_START = 3 * GIB
MMIO_GAP_END = 4 * GIB


@dataclass(frozen=True)
class RamRegion:
    """One contiguous range of guest RAM, bound as one memory slot."""

    gpa: int
    size: int
    slot: int
    offset: int  # into the backend file

    @property
    def end(self) -> int:
        return self.gpa + self.size

    def contains(self, gpa: int, length: int = 1) -> bool:
        return self.gpa <= gpa and gpa + length <= self.end


def ram_regions(size_bytes: int) -> list[RamRegion]:
    """The RAM layout for `size_bytes` of guest memory (a multiple of the page size)."""
    if size_bytes <= 0 or size_bytes % PAGE_SIZE:
        raise ValueError(f"guest memory size {size_bytes} is not a positive multiple of 4 KiB")
    if size_bytes <= MMIO_GAP_START:
        return [RamRegion(0, size_bytes, slot=0, offset=0)]
    return [
        RamRegion(0, MMIO_GAP_START, slot=0, offset=0),
        RamRegion(MMIO_GAP_END, size_bytes - MMIO_GAP_START, slot=1, offset=MMIO_GAP_START),
    ]


def format_size(n: int) -> str:
    """Bytes in the largest binary unit that divides them exactly: "256 MiB", "12 KiB"."""
    for unit, scale in (("TiB", 1 << 40), ("GiB", GIB), ("MiB", MIB), ("KiB", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} byte" if n == 1 else f"{n} bytes"


def approx_size(n: int) -> str:
    """Bytes to a person, to one decimal where the size is not exact: "255.9 MiB"."""
    exact = format_size(n)
    if not exact.endswith(("KiB", "byte", "bytes")) or n < MIB:
        return exact
    for unit, scale in (("GiB", GIB), ("MiB", MIB)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return exact


def page_align_up(n: int) -> int:
    return (n + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)


def page_align_down(n: int) -> int:
    return n & ~(PAGE_SIZE - 1)
