"""One class per KVM file descriptor: `Kvm` (/dev/kvm), `Vm`, `Vcpu`.

This is the only layer that calls ioctl on KVM fds; every failure is a `KvmError`.
"""

from kvmkit.kvm.errors import KvmError, KvmUnavailableError, KvmUnsupportedError
from kvmkit.kvm.system import Kvm
from kvmkit.kvm.vcpu import Vcpu
from kvmkit.kvm.vm import Vm

__all__ = ["Kvm", "KvmError", "KvmUnavailableError", "KvmUnsupportedError", "Vcpu", "Vm"]
