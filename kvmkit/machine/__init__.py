"""Machines: pre-boot resources, the builder (two roads), and the machine lifecycle."""

from kvmkit.machine.builder import RestoreOptions, build_for_boot, build_from_saved
from kvmkit.machine.config import MachineConfig, parse_size
from kvmkit.machine.machine import Machine
from kvmkit.machine.resources import VmResources
from kvmkit.machine.result import RunResult

__all__ = [
    "Machine",
    "MachineConfig",
    "RestoreOptions",
    "RunResult",
    "VmResources",
    "build_for_boot",
    "build_from_saved",
    "parse_size",
]
