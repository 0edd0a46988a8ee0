"""Host exposure: every range of the guest RAM file the VMM process has mapped.

kvmkit maps guest RAM into its own address space only through `HostMappings`,
so "what can the host read of the guest" is always this list of windows.
"""

import ctypes
from dataclasses import dataclass, field

from kvmkit import faults, libc


@dataclass
class HostWindow:
    """`size` bytes of the backend file at `offset`, mapped at host address `addr`."""

    offset: int
    size: int
    addr: int
    owner: str
    view: memoryview = field(repr=False)

    @property
    def end(self) -> int:
        return self.offset + self.size

    def covers(self, offset: int, length: int) -> bool:
        return self.offset <= offset and offset + length <= self.end


class HostMappings:
    """The host's windows onto one guest RAM file."""

    def __init__(self, fd: int, map_flags: int) -> None:
        self.fd = fd
        self.map_flags = map_flags
        self.windows: list[HostWindow] = []

    def map(self, offset: int, size: int, owner: str, prot: int | None = None) -> HostWindow:
        prot = libc.PROT_READ | libc.PROT_WRITE if prot is None else prot
        faults.inject("memory.mmap")
        addr = libc.mmap(size, prot, libc.MAP_SHARED | self.map_flags, self.fd, offset)
        view = memoryview((ctypes.c_char * size).from_address(addr)).cast("B")
        window = HostWindow(offset, size, addr, owner, view)
        self.windows.append(window)
        return window

    def unmap(self, window: HostWindow) -> None:
        window.view.release()
        libc.munmap(window.addr, window.size)
        self.windows.remove(window)

    def unmap_all(self) -> None:
        for window in list(self.windows):
            self.unmap(window)

    def covering(self, offset: int, length: int) -> HostWindow | None:
        for window in self.windows:
            if window.covers(offset, length):
                return window
        return None

    @property
    def mapped_bytes(self) -> int:
        return sum(w.size for w in self.windows)
