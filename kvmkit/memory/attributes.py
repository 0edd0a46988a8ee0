"""Which guest ranges are private: the bookkeeping behind KVM_SET_MEMORY_ATTRIBUTES.

Ranges are page aligned, kept sorted, never overlapping, and merged when adjacent.
"""

import bisect

from kvmkit.memory.layout import PAGE_SIZE


class AttributeMap:
    """A set of private [start, end) ranges; everything else is shared."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []

    @staticmethod
    def _check(gpa: int, size: int) -> None:
        if gpa < 0 or size <= 0 or gpa % PAGE_SIZE or size % PAGE_SIZE:
            raise ValueError(f"range {gpa:#x}+{size:#x} must be non-empty and page aligned")

    def set_private(self, gpa: int, size: int) -> None:
        self._check(gpa, size)
        self._remove(gpa, gpa + size)
        start, end = gpa, gpa + size
        i = bisect.bisect_left(self._starts, start)
        if i > 0 and self._ends[i - 1] == start:  # merge with the range before
            i -= 1
            start = self._starts[i]
            del self._starts[i], self._ends[i]
        if i < len(self._starts) and self._starts[i] == end:  # and the one after
            end = self._ends[i]
            del self._starts[i], self._ends[i]
        self._starts.insert(i, start)
        self._ends.insert(i, end)

    def set_shared(self, gpa: int, size: int) -> None:
        self._check(gpa, size)
        self._remove(gpa, gpa + size)

    def _remove(self, start: int, end: int) -> None:
        i = bisect.bisect_right(self._ends, start)
        while i < len(self._starts) and self._starts[i] < end:
            s, e = self._starts[i], self._ends[i]
            del self._starts[i], self._ends[i]
            if e > end:
                self._starts.insert(i, end)
                self._ends.insert(i, e)
            if s < start:
                self._starts.insert(i, s)
                self._ends.insert(i, start)
                i += 1

    def is_private(self, gpa: int) -> bool:
        i = bisect.bisect_right(self._starts, gpa) - 1
        return i >= 0 and gpa < self._ends[i]

    def ranges(self) -> list[tuple[int, int]]:
        return list(zip(self._starts, self._ends, strict=True))

    @property
    def private_bytes(self) -> int:
        return sum(e - s for s, e in self.ranges())
