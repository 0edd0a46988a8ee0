"""`Kvm`: the /dev/kvm system fd."""

import ctypes
import errno
import os
from typing import TYPE_CHECKING

from kvmkit.closing import Closeable
from kvmkit.kvm.errors import KvmError, KvmUnavailableError, KvmUnsupportedError, open_hint
from kvmkit.kvm.ioctl import kvm_ioctl
from kvmkit.uapi import ioctls
from kvmkit.uapi.caps import Cap
from kvmkit.uapi.cpu import kvm_cpuid2, kvm_cpuid_entry2, kvm_msr_list

DEFAULT_PATH = "/dev/kvm"
SYSFS_MODULES = "/sys/module"
# The module serving /dev/kvm -> the backend's name.
BACKEND_MODULES = {"kvm_intel": "kvm_intel", "kvm_amd": "kvm_amd", "kvm_pvm": "pvm"}


def kvm_backend() -> str:
    """Which KVM backend this host loaded: kvm_intel, kvm_amd, pvm (the kvm_pvm
    module, no VMX/SVM needed), or none."""
    for module, name in BACKEND_MODULES.items():
        if os.path.isdir(os.path.join(SYSFS_MODULES, module)):
            return name
    return "none"


if TYPE_CHECKING:
    from kvmkit.kvm.vm import Vm

CapName = Cap | str | int

# KVM_X86_*_VM, the bit numbers of KVM_CAP_VM_TYPES.
VM_TYPE_NAMES = {0: "default", 1: "sw_protected", 2: "sev", 3: "sev_es", 4: "snp", 5: "tdx"}


def cap_number(cap: CapName) -> int:
    """A capability as its number; accepts `Cap.X`, "X", "KVM_CAP_X" or the number."""
    if isinstance(cap, str):
        key = cap.upper().removeprefix("KVM_CAP_")
        try:
            return Cap[key].value
        except KeyError:
            raise ValueError(f"unknown KVM capability {cap!r}") from None
    return int(cap)


class Kvm(Closeable):
    """The KVM system fd: capabilities, supported CPUID and MSRs, and VM creation."""

    def __init__(self, path: str = DEFAULT_PATH) -> None:
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            code = e.errno or 0
            raise KvmUnavailableError(f"open {path}", code, open_hint(path, code)) from None
        try:
            version = self.api_version = kvm_ioctl(self.fd, ioctls.KVM_GET_API_VERSION)
            if version != ioctls.KVM_API_VERSION:
                raise KvmUnavailableError(
                    "KVM_GET_API_VERSION",
                    errno.EPROTO,
                    f"{path} speaks KVM API {version}, kvmkit needs {ioctls.KVM_API_VERSION}",
                )
        except BaseException:
            os.close(self.fd)
            raise

    # -- lifecycle --------------------------------------------------------
    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # -- queries ----------------------------------------------------------
    def check_extension(self, cap: CapName) -> int:
        return kvm_ioctl(self.fd, ioctls.KVM_CHECK_EXTENSION, cap_number(cap))

    def capabilities(self) -> dict[str, int]:
        """Every capability kvmkit knows, by name, with the host's answer."""
        return {c.name: self.check_extension(c) for c in Cap}

    @property
    def vcpu_mmap_size(self) -> int:
        return kvm_ioctl(self.fd, ioctls.KVM_GET_VCPU_MMAP_SIZE)

    @property
    def is_pvm(self) -> bool:
        """True when /dev/kvm is served by the PVM backend (kvm_pvm module)."""
        return kvm_backend() == "pvm"

    def supported_cpuid(self) -> list[kvm_cpuid_entry2]:
        return read_cpuid(self.fd, ioctls.KVM_GET_SUPPORTED_CPUID)

    def mce_cap_supported(self) -> int:
        """The MCG_CAP bits and bank count KVM can give a vCPU (KVM_X86_GET_MCE_CAP_SUPPORTED)."""
        value = ctypes.c_uint64()
        kvm_ioctl(self.fd, ioctls.KVM_X86_GET_MCE_CAP_SUPPORTED, value)
        return value.value

    def msr_index_list(self) -> list[int]:
        count = 64
        while True:
            header = kvm_msr_list(nmsrs=count)
            buf = (ctypes.c_uint8 * (ctypes.sizeof(header) + 4 * count))()
            ctypes.memmove(buf, ctypes.byref(header), ctypes.sizeof(header))
            try:
                kvm_ioctl(self.fd, ioctls.KVM_GET_MSR_INDEX_LIST, buf)
            except KvmError as e:
                if e.errno != errno.E2BIG:
                    raise
                count = kvm_msr_list.from_buffer(buf).nmsrs
                continue
            n = kvm_msr_list.from_buffer(buf).nmsrs
            return list((ctypes.c_uint32 * n).from_buffer(buf, ctypes.sizeof(header)))

    def vm_types(self) -> list[str]:
        """The VM types this host can create, by name (KVM_CAP_VM_TYPES)."""
        mask = self.check_extension(Cap.VM_TYPES) or 1  # before 6.10: the default type only
        return [VM_TYPE_NAMES.get(bit, f"type {bit}") for bit in range(64) if mask >> bit & 1]

    # -- children ---------------------------------------------------------
    def create_vm(self, vm_type: int = 0) -> "Vm":
        from kvmkit.kvm.vm import Vm

        if vm_type:
            mask = self.check_extension(Cap.VM_TYPES)
            if not mask >> vm_type & 1:
                name = VM_TYPE_NAMES.get(vm_type, f"type {vm_type}")
                raise KvmUnsupportedError(
                    f"VM type {name}",
                    f"this host offers VM types {', '.join(self.vm_types())}"
                    f" (KVM_CAP_VM_TYPES is {mask:#x})",
                )
        return Vm(self, kvm_ioctl(self.fd, ioctls.KVM_CREATE_VM, vm_type))


def read_cpuid(fd: int, request: int) -> list[kvm_cpuid_entry2]:
    nent = 64
    while True:
        buf = (
            ctypes.c_uint8 * (ctypes.sizeof(kvm_cpuid2) + nent * ctypes.sizeof(kvm_cpuid_entry2))
        )()
        kvm_cpuid2.from_buffer(buf).nent = nent
        try:
            kvm_ioctl(fd, request, buf)
        except KvmError as e:
            if e.errno == errno.E2BIG and nent < 4096:
                nent *= 2
                continue
            raise
        n = kvm_cpuid2.from_buffer(buf).nent
        entries = (kvm_cpuid_entry2 * n).from_buffer(buf, ctypes.sizeof(kvm_cpuid2))
        return [kvm_cpuid_entry2.from_buffer_copy(e) for e in entries]
