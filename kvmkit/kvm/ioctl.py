"""The one place kvmkit calls ioctl on a KVM fd."""

import ctypes
from typing import Any, TypeAlias

from kvmkit import faults as _faults
from kvmkit.kvm.errors import KvmError
from kvmkit.libc import raw_ioctl
from kvmkit.uapi.caps import Cap
from kvmkit.uapi.ioctls import KVM_CHECK_EXTENSION, ioctl_name

Arg: TypeAlias = (
    "int | ctypes.Structure | ctypes.Array[Any] | ctypes._Pointer[Any]"
    " | ctypes._SimpleCData[Any] | None"
)


def kvm_ioctl(fd: int, request: int, arg: Arg = None, *, hint: str = "") -> int:
    """ioctl(fd, request, arg) returning its non-negative result, or raising `KvmError`.

    `arg` is an int (passed by value) or a ctypes object (passed by address).
    """
    if _faults.active() is not None:
        injected = _faults.planned_errno(f"ioctl:{ioctl_name(request)}")
        if injected:
            raise KvmError(ioctl_name(request), injected, hint or "fault injected by the plan")
    if arg is None:
        ret = raw_ioctl(fd, ctypes.c_ulong(request), ctypes.c_ulong(0))
    elif isinstance(arg, int):
        ret = raw_ioctl(fd, ctypes.c_ulong(request), ctypes.c_ulong(arg))
    else:
        ret = raw_ioctl(fd, ctypes.c_ulong(request), ctypes.byref(arg))
    if ret < 0:
        raise KvmError(ioctl_name(request), ctypes.get_errno(), hint)
    if request == KVM_CHECK_EXTENSION and _faults.active() is not None:
        return _faults.capability_answer(cap_name(int(arg)), ret)  # type: ignore[arg-type]
    return int(ret)


def cap_name(number: int) -> str:
    try:
        return Cap(number).name
    except ValueError:
        return str(number)
