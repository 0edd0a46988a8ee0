"""Thin ctypes bindings to the libc calls kvmkit needs and the os module lacks.

`ioctl` is called through ctypes so that the GIL is released during KVM_RUN and
arguments are passed by address, without fcntl.ioctl's 1024-byte copy limit.
"""

import ctypes
import os

_libc = ctypes.CDLL(None, use_errno=True)

raw_ioctl = _libc.ioctl
raw_ioctl.restype = ctypes.c_int

_mmap = _libc.mmap
_mmap.restype = ctypes.c_void_p
_mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_munmap = _libc.munmap
_munmap.restype = ctypes.c_int
_munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_madvise = _libc.madvise
_madvise.restype = ctypes.c_int
_madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_fallocate = _libc.fallocate
_fallocate.restype = ctypes.c_int
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]

PROT_READ = 0x1
PROT_WRITE = 0x2
MAP_SHARED = 0x01
MAP_PRIVATE = 0x02
MAP_FIXED = 0x10
MAP_ANONYMOUS = 0x20
MAP_NORESERVE = 0x4000
MAP_FAILED = ctypes.c_void_p(-1).value

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02


def errno_error(call: str) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{call}: {os.strerror(err)}")


def mmap(
    length: int,
    prot: int,
    flags: int,
    fd: int = -1,
    offset: int = 0,
    addr: int | None = None,
) -> int:
    """mmap(2); returns the address. Raises OSError with errno on failure."""
    ret = _mmap(addr, length, prot, flags, fd, offset)
    if ret is None or ret == MAP_FAILED:
        raise errno_error("mmap")
    return int(ret)


def munmap(addr: int, length: int) -> None:
    if _munmap(addr, length) != 0:
        raise errno_error("munmap")


def madvise(addr: int, length: int, advice: int) -> None:
    if _madvise(addr, length, advice) != 0:
        raise errno_error("madvise")


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _fallocate(fd, mode, offset, length) != 0:
        raise errno_error("fallocate")
