"""Devices: bus clients that see reads and writes, never vCPUs or threads."""

from kvmkit.devices.bus import Bus, BusError, Device, Mapping, mmio_bus, pio_bus
from kvmkit.devices.debug_exit import DebugExit
from kvmkit.devices.post import PostCode
from kvmkit.devices.serial import Serial16550

__all__ = [
    "Bus",
    "BusError",
    "DebugExit",
    "Device",
    "Mapping",
    "PostCode",
    "Serial16550",
    "mmio_bus",
    "pio_bus",
]
