"""A machine: config + VM + vCPU threads + devices + lifecycle."""

from kvmkit.machine.config import MachineConfig, parse_size
from kvmkit.machine.machine import Machine
from kvmkit.machine.result import RunResult

__all__ = ["Machine", "MachineConfig", "RunResult", "parse_size"]
