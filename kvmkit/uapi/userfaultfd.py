"""The userfaultfd uAPI (include/uapi/linux/userfaultfd.h): structures and ioctls."""

import ctypes
from ctypes import c_int64, c_uint8, c_uint16, c_uint32, c_uint64

from kvmkit.uapi.ioctl import IOC_NONE, IOC_READ, IOC_WRITE, ioc

UFFDIO = 0xAA
UFFD_API = 0xAA
SYS_userfaultfd = 323  # x86_64
UFFD_USER_MODE_ONLY = 1
UFFDIO_REGISTER_MODE_MISSING = 1 << 0
UFFD_EVENT_PAGEFAULT = 0x12
UFFDIO_COPY_MODE_DONTWAKE = 1 << 0
_UFFDIO_COPY = 0x03
_UFFDIO_ZEROPAGE = 0x04


class uffdio_api(ctypes.Structure):
    _fields_ = [("api", c_uint64), ("features", c_uint64), ("ioctls", c_uint64)]


class uffdio_range(ctypes.Structure):
    _fields_ = [("start", c_uint64), ("len", c_uint64)]


class uffdio_register(ctypes.Structure):
    _fields_ = [("range", uffdio_range), ("mode", c_uint64), ("ioctls", c_uint64)]


class uffdio_copy(ctypes.Structure):
    _fields_ = [
        ("dst", c_uint64),
        ("src", c_uint64),
        ("len", c_uint64),
        ("mode", c_uint64),
        ("copy", c_int64),
    ]


class uffdio_zeropage(ctypes.Structure):
    _fields_ = [("range", uffdio_range), ("mode", c_uint64), ("zeropage", c_int64)]


class uffd_msg(ctypes.Structure):
    """The event header and, for UFFD_EVENT_PAGEFAULT, flags and the faulting address."""

    _fields_ = [
        ("event", c_uint8),
        ("reserved1", c_uint8),
        ("reserved2", c_uint16),
        ("reserved3", c_uint32),
        ("flags", c_uint64),
        ("address", c_uint64),
        ("ptid", c_uint32),
        ("pad", c_uint32),
    ]


def _uffd(direction: int, nr: int, arg: type[ctypes.Structure]) -> int:
    return ioc(direction, nr, ctypes.sizeof(arg), UFFDIO)


USERFAULTFD_IOC_NEW = ioc(IOC_NONE, 0x00, 0, UFFDIO)  # on /dev/userfaultfd
UFFDIO_API = _uffd(IOC_READ | IOC_WRITE, 0x3F, uffdio_api)
UFFDIO_REGISTER = _uffd(IOC_READ | IOC_WRITE, 0x00, uffdio_register)
UFFDIO_UNREGISTER = _uffd(IOC_READ, 0x01, uffdio_range)
UFFDIO_WAKE = _uffd(IOC_READ, 0x02, uffdio_range)
UFFDIO_COPY = _uffd(IOC_READ | IOC_WRITE, _UFFDIO_COPY, uffdio_copy)
UFFDIO_ZEROPAGE = _uffd(IOC_READ | IOC_WRITE, _UFFDIO_ZEROPAGE, uffdio_zeropage)
