"""kvmkit: a guest-first virtual machine monitor and KVM test bench, in Python."""

__version__ = "0.1.0"
