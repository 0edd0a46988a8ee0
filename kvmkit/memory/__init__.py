"""Guest memory: backends (guest_memfd by default, memfd, hugetlb, THP), layout, host
windows (exposure), discard and prealloc, NUMA policy, memory attributes."""

from kvmkit.memory.attributes import AttributeMap
from kvmkit.memory.backend import BACKEND_NAMES, Backend, BackendChoice, choose_backend
from kvmkit.memory.exposure import HostWindow
from kvmkit.memory.guest_memory import GuestMemory, GuestMemoryError
from kvmkit.memory.layout import GIB, MIB, PAGE_SIZE, RamRegion, ram_regions
from kvmkit.memory.numa import NumaPolicy

__all__ = [
    "BACKEND_NAMES",
    "GIB",
    "MIB",
    "PAGE_SIZE",
    "AttributeMap",
    "Backend",
    "BackendChoice",
    "GuestMemory",
    "GuestMemoryError",
    "HostWindow",
    "NumaPolicy",
    "RamRegion",
    "choose_backend",
    "ram_regions",
]
