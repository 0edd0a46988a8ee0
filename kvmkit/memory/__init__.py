"""Guest memory: backends (guest_memfd by default, memfd), layout, host access."""

from kvmkit.memory.backend import BACKEND_NAMES, Backend, BackendChoice, choose_backend
from kvmkit.memory.guest_memory import GuestMemory, GuestMemoryError
from kvmkit.memory.layout import GIB, MIB, PAGE_SIZE, RamRegion, ram_regions

__all__ = [
    "BACKEND_NAMES",
    "GIB",
    "MIB",
    "PAGE_SIZE",
    "Backend",
    "BackendChoice",
    "GuestMemory",
    "GuestMemoryError",
    "RamRegion",
    "choose_backend",
    "ram_regions",
]
