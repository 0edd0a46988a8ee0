"""The Linux ioctl number encoding (asm-generic/ioctl.h) for the KVM type 0xAE."""

import ctypes
from typing import Any, TypeAlias

KVMIO = 0xAE

IOC_NONE = 0
IOC_WRITE = 1
IOC_READ = 2

_SizeSpec: TypeAlias = (
    "int | type[ctypes.Structure] | type[ctypes.Union] | type[ctypes._SimpleCData[Any]]"
)


def _size_of(arg: _SizeSpec) -> int:
    return arg if isinstance(arg, int) else ctypes.sizeof(arg)


def ioc(direction: int, nr: int, size: int, type_: int = KVMIO) -> int:
    """`_IOC(dir, type, nr, size)`: dir<<30 | size<<16 | type<<8 | nr."""
    if not 0 <= size < (1 << 14):
        raise ValueError(f"ioctl argument size {size} does not fit in 14 bits")
    return (direction << 30) | (size << 16) | (type_ << 8) | nr


def io(nr: int) -> int:
    return ioc(IOC_NONE, nr, 0)


def ior(nr: int, arg: _SizeSpec) -> int:
    return ioc(IOC_READ, nr, _size_of(arg))


def iow(nr: int, arg: _SizeSpec) -> int:
    return ioc(IOC_WRITE, nr, _size_of(arg))


def iowr(nr: int, arg: _SizeSpec) -> int:
    return ioc(IOC_READ | IOC_WRITE, nr, _size_of(arg))
