"""`KvmError`: a failed KVM ioctl with its name, errno and a hint a person can act on."""

import errno as errno_mod
import os

from kvmkit.errors import KvmkitError


class KvmError(KvmkitError):
    """An ioctl on a KVM fd failed.

    Attributes: `ioctl` (the KVM_* name), `errno`, `hint` (what to do about it).
    """

    def __init__(self, ioctl: str, errno: int, hint: str = "") -> None:
        self.ioctl = ioctl
        self.errno = errno
        self.hint = hint or default_hint(ioctl, errno)
        code = errno_mod.errorcode.get(errno, str(errno))
        message = f"{ioctl} failed: {code} ({os.strerror(errno)})"
        if self.hint:
            message += f"; {self.hint}"
        super().__init__(message)


class KvmUnavailableError(KvmError):
    """/dev/kvm cannot be opened or speaks another API version."""


class KvmUnsupportedError(KvmError):
    """The host's KVM lacks something kvmkit was asked to use. `str()` is "what: why"."""

    def __init__(self, what: str, hint: str) -> None:
        super().__init__(what, errno_mod.EOPNOTSUPP, hint)
        self.args = (f"{what}: {hint}",)

    def __str__(self) -> str:
        return str(self.args[0])


def open_hint(path: str, errno: int) -> str:
    if errno == errno_mod.ENOENT:
        return (
            f"{path} does not exist: load a KVM module (modprobe kvm_intel, kvm_amd or kvm_pvm)"
            " or enable virtualization in the firmware"
        )
    if errno in (errno_mod.EACCES, errno_mod.EPERM):
        return (
            f"no permission to open {path}: add yourself to the kvm group"
            " (usermod -aG kvm $USER, then log in again) or run as root"
        )
    if errno == errno_mod.ENXIO or errno == errno_mod.ENODEV:
        return f"{path} exists but no KVM backend is loaded"
    return ""


_HINTS: dict[tuple[str, int], str] = {
    (
        "KVM_CREATE_VM",
        errno_mod.EINVAL,
    ): "this host does not support that VM type (see KVM_CAP_VM_TYPES)",
    (
        "KVM_CREATE_VCPU",
        errno_mod.EINVAL,
    ): "the vCPU id is above KVM_CAP_MAX_VCPU_ID or already in use",
    ("KVM_CREATE_VCPU", errno_mod.EEXIST): "a vCPU with that id already exists",
    ("KVM_SET_USER_MEMORY_REGION2", errno_mod.EEXIST): "the range overlaps an existing memory slot",
    ("KVM_SET_USER_MEMORY_REGION", errno_mod.EEXIST): "the range overlaps an existing memory slot",
    ("KVM_SET_USER_MEMORY_REGION2", errno_mod.EINVAL): (
        "check that address, size and guest_memfd offset are page aligned, the range fits in the"
        " guest_memfd file and is not bound to another slot, and that guest_memfd slots carry no"
        " other flag (6.18 refuses LOG_DIRTY_PAGES and READONLY with GUEST_MEMFD)"
    ),
    ("KVM_SET_USER_MEMORY_REGION", errno_mod.EINVAL): (
        "check that address and size are page aligned and the flags are valid"
    ),
    ("KVM_SET_MEMORY_ATTRIBUTES", errno_mod.ENOTTY): (
        "this kernel has no memory attributes (KVM_CAP_MEMORY_ATTRIBUTES is 0)"
    ),
    ("KVM_PRE_FAULT_MEMORY", errno_mod.EOPNOTSUPP): (
        "this kernel cannot pre-fault guest memory (KVM_CAP_PRE_FAULT_MEMORY is 0)"
    ),
    ("KVM_ENABLE_CAP", errno_mod.EBUSY): "some capabilities must be enabled before any vCPU exists",
    ("KVM_RUN", errno_mod.EFAULT): "guest memory mapping or kvm_run page is gone",
    ("KVM_GET_DIRTY_LOG", errno_mod.ENOENT): "the slot does not log dirty pages",
    ("KVM_GET_DIRTY_LOG", errno_mod.ENXIO): "the dirty ring is enabled; harvest the ring instead",
}


def default_hint(ioctl: str, errno: int) -> str:
    hint = _HINTS.get((ioctl, errno))
    if hint:
        return hint
    if errno == errno_mod.ENOTTY:
        return f"this kernel does not implement {ioctl}; check the matching capability first"
    if errno == errno_mod.ENOMEM:
        return "the host is out of memory (or the hugetlb pool is empty)"
    if errno in (errno_mod.EACCES, errno_mod.EPERM):
        return "permission denied by the host kernel"
    return ""
