"""kvmkit's own guest programs: sources, the guest ABI, and the builder."""

from kvmkit.guests.abi import BootInfo
from kvmkit.guests.build import BUILTIN, GuestBuildError, GuestProgram, build_image

__all__ = ["BUILTIN", "BootInfo", "GuestBuildError", "GuestProgram", "build_image"]
