"""Loaders: turn a kernel file (vmlinux, bzImage) and an initrd into bytes at guest
addresses plus an entry point. Nothing here touches KVM."""

from kvmkit.loader.linux import GuestRam, LinuxBootPlan, load_linux

__all__ = ["GuestRam", "LinuxBootPlan", "load_linux"]
