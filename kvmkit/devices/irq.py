"""Interrupt lines as devices see them: raise, lower, or pulse one GSI.

The machine gives each device that needs one an `IrqLine` (kvmkit/machine/interrupts.py
has the KVM ones: KVM_IRQ_LINE and irqfd). `LevelRecorder` is the line of a machine
without an in-kernel irqchip, where nothing can take an interrupt: it only remembers
the level (and unit tests read it).
"""

from collections import deque
from typing import Protocol


class IrqLine(Protocol):
    gsi: int

    def set_level(self, high: bool) -> None:
        """Drive the line: an edge-triggered pin fires on a low-to-high change."""

    def pulse(self) -> None:
        """One edge: raise and lower at once (an irqfd write, for example)."""


class LevelRecorder:
    """An interrupt line connected to nothing: records the levels driven onto it."""

    def __init__(self, gsi: int = -1) -> None:
        self.gsi = gsi
        self.level = False
        self.levels: deque[bool] = deque(maxlen=64)  # the last levels driven
        self.pulses = 0

    def set_level(self, high: bool) -> None:
        self.level = high
        self.levels.append(high)

    def pulse(self) -> None:
        self.pulses += 1
