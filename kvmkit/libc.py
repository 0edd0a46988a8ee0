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
FALLOC_FL_ZERO_RANGE = 0x10


def malloc_trim() -> None:
    """Give the heap's free memory back to the kernel (what building a machine
    allocated and freed): about 1.5 MB of the VMM's RSS."""
    _libc.malloc_trim(0)


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


_mincore = _libc.mincore
_mincore.restype = ctypes.c_int
_mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long

MADV_DONTNEED = 4
MADV_HUGEPAGE = 14
MADV_POPULATE_WRITE = 23  # Linux 5.14: fault the range in, writable, in one call
MADV_COLLAPSE = 25

SYS_mbind = 237
SYS_set_mempolicy = 238
SYS_get_mempolicy = 239
MPOL_DEFAULT = 0
MPOL_PREFERRED = 1
MPOL_BIND = 2
MPOL_INTERLEAVE = 3
MPOL_F_ADDR = 1 << 1
NODEMASK_BITS = 1024


def mincore(addr: int, length: int, page_size: int = 4096) -> bytes:
    """One byte per page of [addr, addr+length): non-zero where the page is resident
    (for a shared file mapping: where the file's page exists)."""
    pages = (length + page_size - 1) // page_size
    vec = (ctypes.c_ubyte * pages)()
    if _mincore(addr, length, vec) != 0:
        raise errno_error("mincore")
    return bytes(vec)  # only bit 0 is defined; the rest read as zero


def mincore_resident_pages(addr: int, length: int, page_size: int = 4096) -> int:
    """How many pages of [addr, addr+length) are resident."""
    vec = mincore(addr, length, page_size)
    return len(vec) - vec.count(0)


def _nodemask(nodes: tuple[int, ...]) -> ctypes.Array:
    mask = (ctypes.c_ulong * (NODEMASK_BITS // 64))()
    for n in nodes:
        mask[n // 64] |= 1 << (n % 64)
    return mask


def mbind(addr: int, length: int, mode: int, nodes: tuple[int, ...]) -> None:
    mask = _nodemask(nodes)
    ret = _syscall(
        ctypes.c_long(SYS_mbind),
        ctypes.c_void_p(addr),
        ctypes.c_ulong(length),
        ctypes.c_int(mode),
        mask if nodes else None,
        ctypes.c_ulong(NODEMASK_BITS + 1),
        ctypes.c_uint(0),
    )
    if ret != 0:
        raise errno_error("mbind")


def set_mempolicy(mode: int, nodes: tuple[int, ...]) -> None:
    """The calling thread's memory policy (MPOL_DEFAULT with no nodes resets it)."""
    mask = _nodemask(nodes)
    ret = _syscall(
        ctypes.c_long(SYS_set_mempolicy),
        ctypes.c_int(mode),
        mask if nodes else None,
        ctypes.c_ulong(NODEMASK_BITS + 1),
    )
    if ret != 0:
        raise errno_error("set_mempolicy")


def get_mempolicy_at(addr: int) -> tuple[int, tuple[int, ...]]:
    """The policy mode and node list governing the mapping at `addr`."""
    mode = ctypes.c_int(-1)
    mask = _nodemask(())
    ret = _syscall(
        ctypes.c_long(SYS_get_mempolicy),
        ctypes.byref(mode),
        mask,
        ctypes.c_ulong(NODEMASK_BITS + 1),
        ctypes.c_void_p(addr),
        ctypes.c_ulong(MPOL_F_ADDR),
    )
    if ret != 0:
        raise errno_error("get_mempolicy")
    nodes = tuple(i for i in range(NODEMASK_BITS) if mask[i // 64] >> (i % 64) & 1)
    return mode.value, nodes


SYS_cachestat = 451


class _cachestat_range(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _cachestat(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_uint64)
        for name in ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recently_evicted")
    ]


def cachestat_pages(fd: int, offset: int, length: int) -> int:
    """cachestat(2) (6.5+): how many pages of the file's [offset, offset+length) are in
    its page cache. Its cost follows the pages present, not the range's size."""
    rng = _cachestat_range(offset, length)
    out = _cachestat()
    if _syscall(SYS_cachestat, fd, ctypes.byref(rng), ctypes.byref(out), 0) < 0:
        raise errno_error("cachestat")
    return int(out.nr_cache)


TFD_CLOEXEC = 0o2000000
TFD_NONBLOCK = 0o4000
CLOCK_MONOTONIC = 1
_timerfd_create = _libc.timerfd_create
_timerfd_create.argtypes = [ctypes.c_int, ctypes.c_int]
_timerfd_create.restype = ctypes.c_int
_timerfd_settime = _libc.timerfd_settime
_timerfd_settime.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
_timerfd_settime.restype = ctypes.c_int


def timerfd(interval_s: float) -> int:
    """A non-blocking timerfd (CLOCK_MONOTONIC) that fires every `interval_s` seconds
    (os.timerfd_* arrive in Python 3.13)."""
    fd = _timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC | TFD_NONBLOCK)
    if fd < 0:
        raise errno_error("timerfd_create")
    sec, nsec = int(interval_s), int(interval_s % 1 * 1e9)
    spec = (ctypes.c_long * 4)(sec, nsec, sec, nsec)  # it_interval, it_value
    if _timerfd_settime(fd, 0, ctypes.addressof(spec), None) < 0:
        err = errno_error("timerfd_settime")
        os.close(fd)
        raise err
    return fd
