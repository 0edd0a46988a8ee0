"""The guest_memfd test bench: every guest_memfd behaviour the kernel's own selftest
(tools/testing/selftests/kvm/guest_memfd_test.c) checks that this host can exercise,
against the real kernel, each with the outcome it expects.

`kvmkit selftest memory` prints them as a table; tests/kvm runs them under pytest.
A check returns the outcome it observed ("ok", an errno name, "SIGBUS", ...); it
passes when that equals its `expect`. A check whose behaviour is a known, measured
deviation of this host (PVM) from upstream reports DEVIATES instead of FAIL.
"""

import contextlib
import ctypes
import faulthandler
import functools
import io
import os
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from kvmkit import libc
from kvmkit.hostcheck.probes import gmem_probe
from kvmkit.kvm import Kvm, Vm
from kvmkit.testing.checks import Check, Skip, all_same, outcome
from kvmkit.uapi.caps import Cap
from kvmkit.uapi.memory import (
    GUEST_MEMFD_FLAG_INIT_SHARED,
    GUEST_MEMFD_FLAG_MMAP,
    GUEST_MEMFD_FLAG_NO_DIRECT_MAP,
    KVM_MEM_GUEST_MEMFD,
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_READONLY,
    kvm_create_guest_memfd,
)

PAGE = 4096
SIZE = 4 * PAGE
MMAP_SHARED = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED
FALLOC_ZERO_RANGE = 0x10
KEEP = libc.FALLOC_FL_KEEP_SIZE
PUNCH = libc.FALLOC_FL_PUNCH_HOLE | libc.FALLOC_FL_KEEP_SIZE


# -- fixtures ---------------------------------------------------------------------------
@contextlib.contextmanager
def bench_vm() -> Iterator[Vm]:
    with Kvm() as kvm, kvm.create_vm() as vm:
        if not vm.check_extension(Cap.GUEST_MEMFD):
            raise Skip("KVM_CAP_GUEST_MEMFD is 0")
        yield vm


@contextlib.contextmanager
def gmem(vm: Vm, size: int = SIZE, flags: int = MMAP_SHARED) -> Iterator[int]:
    if flags & ~vm.guest_memfd_flags():
        raise Skip(f"this host's guest_memfd lacks flags {flags & ~vm.guest_memfd_flags():#x}")
    fd = vm.create_guest_memfd(size, flags)
    try:
        yield fd
    finally:
        os.close(fd)


@contextlib.contextmanager
def mapped(fd: int, size: int = SIZE, flags: int = libc.MAP_SHARED) -> Iterator[int]:
    addr = libc.mmap(size, libc.PROT_READ | libc.PROT_WRITE, flags, fd)
    try:
        yield addr
    finally:
        libc.munmap(addr, size)


def raw_create(vm: Vm, size: int, flags: int = 0, reserved0: int = 0) -> int:
    """KVM_CREATE_GUEST_MEMFD with nothing checked or hinted; returns the fd or raises."""
    from kvmkit.kvm.ioctl import kvm_ioctl
    from kvmkit.uapi.ioctls import KVM_CREATE_GUEST_MEMFD

    request = kvm_create_guest_memfd(size=size, flags=flags)
    request.reserved[0] = reserved0
    fd = kvm_ioctl(vm.fd, KVM_CREATE_GUEST_MEMFD, request)
    os.close(fd)
    return fd


def bind(
    vm: Vm,
    slot: int,
    gpa: int,
    size: int,
    fd: int,
    offset: int = 0,
    flags: int = KVM_MEM_GUEST_MEMFD,
    uaddr: int = 0,
) -> None:
    vm.set_user_memory_region2(
        slot, gpa, size, uaddr, flags=flags, guest_memfd=fd, guest_memfd_offset=offset
    )


def in_child(action: Callable[[], object]) -> str:
    """Run `action` in a forked child: "ok", or the signal that killed it."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            faulthandler.disable()  # the signal is the expected outcome, not a crash to report
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)
            action()
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return signal.Signals(os.WTERMSIG(status)).name
    return "ok" if os.WEXITSTATUS(status) == 0 else f"exit {os.WEXITSTATUS(status)}"


# -- creation -----------------------------------------------------------------------------
def create_size_zero() -> str:
    with bench_vm() as vm:
        return outcome(lambda: raw_create(vm, 0))


def create_size_unaligned() -> str:
    with bench_vm() as vm:
        return all_same([outcome(functools.partial(raw_create, vm, s)) for s in range(1, PAGE)])


def create_flags_per_capability() -> str:
    """Each single flag bit: accepted iff KVM_CAP_GUEST_MEMFD_FLAGS has it, else EINVAL."""
    with bench_vm() as vm:
        valid = vm.guest_memfd_flags()
        wrong = []
        for bit in range(64):
            got = outcome(functools.partial(raw_create, vm, PAGE, 1 << bit))
            want = "ok" if valid >> bit & 1 else "EINVAL"
            if got != want:
                wrong.append(f"bit {bit}: {got}")
        return "as the capability says" if not wrong else "; ".join(wrong)


def create_reserved_ignored() -> str:
    with bench_vm() as vm:
        return outcome(lambda: raw_create(vm, PAGE, 0, reserved0=1))


def create_no_direct_map() -> str:
    with bench_vm() as vm:
        if vm.guest_memfd_flags() & GUEST_MEMFD_FLAG_NO_DIRECT_MAP:
            raise Skip("this host offers NO_DIRECT_MAP; creation is covered by the flags check")
        return outcome(lambda: raw_create(vm, PAGE, MMAP_SHARED | GUEST_MEMFD_FLAG_NO_DIRECT_MAP))


def create_multiple() -> str:
    with bench_vm() as vm, gmem(vm, PAGE, 0) as a, gmem(vm, 2 * PAGE, 0) as b:
        sa, sb = os.fstat(a), os.fstat(b)
        if (sa.st_size, sb.st_size) != (PAGE, 2 * PAGE):
            return f"sizes {sa.st_size}, {sb.st_size}"
        return "distinct files" if sa.st_ino != sb.st_ino else "same inode"


# -- file operations ----------------------------------------------------------------------
def file_read_write() -> str:
    with bench_vm() as vm, gmem(vm) as fd:
        return all_same([outcome(lambda: os.read(fd, 64)), outcome(lambda: os.write(fd, b"x"))])


def file_pread_pwrite() -> str:
    with bench_vm() as vm, gmem(vm) as fd:
        return all_same(
            [
                outcome(lambda: os.pread(fd, 64, 0)),
                outcome(lambda: os.pwrite(fd, b"x", 0)),
                outcome(lambda: os.lseek(fd, PAGE, os.SEEK_SET)),
            ]
        )


def file_size_fixed() -> str:
    with bench_vm() as vm, gmem(vm) as fd:
        st = os.fstat(fd)
        if st.st_size != SIZE or st.st_blksize != PAGE:
            return f"st_size {st.st_size}, st_blksize {st.st_blksize}"
        return all_same(
            [outcome(lambda: os.ftruncate(fd, 2 * SIZE)), outcome(lambda: os.ftruncate(fd, PAGE))]
        )


# -- mmap -----------------------------------------------------------------------------------
def mmap_without_flag() -> str:
    with bench_vm() as vm, gmem(vm, flags=0) as fd:
        return outcome(lambda: libc.munmap(libc.mmap(SIZE, 3, libc.MAP_SHARED, fd), SIZE))


def mmap_private() -> str:
    with bench_vm() as vm, gmem(vm) as fd:
        return outcome(lambda: libc.munmap(libc.mmap(SIZE, 3, libc.MAP_PRIVATE, fd), SIZE))


def mmap_shared_punch() -> str:
    """Fill the file through the mapping, punch the first page: it reads 0, the rest stays."""
    with bench_vm() as vm, gmem(vm) as fd, mapped(fd) as addr:
        ctypes.memset(addr, 0xAA, SIZE)
        libc.fallocate(fd, PUNCH, 0, PAGE)
        data = ctypes.string_at(addr, SIZE)
        if data[:PAGE] != bytes(PAGE):
            return "punched page not zero"
        if data[PAGE:] != b"\xaa" * (SIZE - PAGE):
            return "data outside the punch changed"
        ctypes.memset(addr, 0xAA, PAGE)
        return "ok" if ctypes.string_at(addr, SIZE) == b"\xaa" * SIZE else "refill lost"


def mmap_private_memory_sigbus() -> str:
    """Without INIT_SHARED, memory starts private: a host touch gets SIGBUS."""
    with bench_vm() as vm, gmem(vm, flags=GUEST_MEMFD_FLAG_MMAP) as fd:
        return in_child(lambda: ctypes.memset(libc.mmap(SIZE, 3, libc.MAP_SHARED, fd), 1, 1))


def mmap_beyond_file_sigbus() -> str:
    with bench_vm() as vm, gmem(vm) as fd:
        return in_child(
            lambda: ctypes.memset(libc.mmap(4 * SIZE, 3, libc.MAP_SHARED, fd) + SIZE, 1, 1)
        )


def mmap_no_collapse() -> str:
    """MADV_HUGEPAGE is accepted; MADV_COLLAPSE must not build a huge folio (EINVAL)."""
    pmd = 2 << 20
    with bench_vm() as vm, gmem(vm, pmd) as fd:
        reserve = libc.mmap(2 * pmd, 0, libc.MAP_PRIVATE | libc.MAP_ANONYMOUS)
        try:
            aligned = (reserve + pmd - 1) & ~(pmd - 1)
            addr = libc.mmap(pmd, 3, libc.MAP_SHARED | libc.MAP_FIXED, fd, addr=aligned)
            for off in range(0, pmd, PAGE):
                ctypes.string_at(addr + off, 1)
            libc.madvise(addr, pmd, libc.MADV_HUGEPAGE)
            return outcome(lambda: libc.madvise(addr, pmd, libc.MADV_COLLAPSE))
        finally:
            libc.munmap(reserve, 2 * pmd)


def mmap_mbind() -> str:
    """mbind/get_mempolicy round-trip on a guest_memfd mapping; a bad policy is EINVAL."""
    with bench_vm() as vm, gmem(vm) as fd, mapped(fd) as addr:
        libc.mbind(addr, 2 * PAGE, libc.MPOL_BIND, (0,))
        if libc.get_mempolicy_at(addr) != (libc.MPOL_BIND, (0,)):
            return f"policy read back as {libc.get_mempolicy_at(addr)}"
        libc.mbind(addr, SIZE, libc.MPOL_DEFAULT, ())
        if libc.get_mempolicy_at(addr)[0] != libc.MPOL_DEFAULT:
            return "MPOL_DEFAULT not restored"
        bad = outcome(lambda: libc.mbind(addr, PAGE, 999, (0,)))
        return "ok" if bad == "EINVAL" else f"policy 999: {bad}"


# -- fallocate --------------------------------------------------------------------------------
def fallocate_mode0() -> str:
    with bench_vm() as vm, gmem(vm) as fd:
        return outcome(lambda: libc.fallocate(fd, 0, 0, PAGE))


def fallocate_keep_size() -> str:
    with bench_vm() as vm, gmem(vm) as fd:
        return all_same(
            [
                outcome(lambda: libc.fallocate(fd, KEEP, 0, SIZE)),
                outcome(lambda: libc.fallocate(fd, KEEP, PAGE, PAGE)),
            ]
        )


def fallocate_beyond_end() -> str:
    with bench_vm() as vm, gmem(vm) as fd:
        return all_same(
            [
                outcome(lambda: libc.fallocate(fd, KEEP, SIZE, PAGE)),
                outcome(lambda: libc.fallocate(fd, KEEP, SIZE + PAGE, PAGE)),
            ]
        )


def punch_beyond_end() -> str:
    with bench_vm() as vm, gmem(vm) as fd:
        return all_same(
            [
                outcome(lambda: libc.fallocate(fd, PUNCH, SIZE, PAGE)),
                outcome(lambda: libc.fallocate(fd, PUNCH, SIZE + PAGE, PAGE)),
            ]
        )


def punch_unaligned() -> str:
    cases = [
        (0, 1),
        (0, PAGE - 1),
        (0, PAGE + 1),
        (1, 1),
        (1, PAGE - 1),
        (1, PAGE),
        (1, PAGE + 1),
        (PAGE, 1),
        (PAGE, PAGE - 1),
        (PAGE, PAGE + 1),
    ]
    with bench_vm() as vm, gmem(vm) as fd:
        return all_same([outcome(functools.partial(libc.fallocate, fd, PUNCH, *c)) for c in cases])


def zero_range() -> str:
    with bench_vm() as vm, gmem(vm) as fd:
        return outcome(lambda: libc.fallocate(fd, FALLOC_ZERO_RANGE | KEEP, 0, PAGE))


def punch_frees_memory() -> str:
    """Pages the host touched exist; after a punch, none do (host memory returned)."""
    with bench_vm() as vm, gmem(vm) as fd, mapped(fd) as addr:
        ctypes.memset(addr, 1, SIZE)
        before = libc.mincore_resident_pages(addr, SIZE)
        libc.fallocate(fd, PUNCH, 0, SIZE)
        after = libc.mincore_resident_pages(addr, SIZE)
        return "freed" if (before, after) == (SIZE // PAGE, 0) else f"{before} -> {after} pages"


def _meminfo_kib(field: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise Skip(f"/proc/meminfo has no {field}")


def fallocate_allocates() -> str:
    """fallocate(KEEP_SIZE) takes host memory at once and a punch gives it back: the
    file's own pages, as cachestat(2) counts them (allocated pages included), or where
    there is no cachestat the host's Cached, which other processes move too."""
    size = 64 << 20
    pages = size >> 12
    with bench_vm() as vm, gmem(vm, size) as fd:
        try:
            before = libc.cachestat_pages(fd, 0, size)
        except OSError:
            return _fallocate_by_meminfo(fd, size)
        libc.fallocate(fd, KEEP, 0, size)
        grown = libc.cachestat_pages(fd, 0, size) - before
        libc.fallocate(fd, PUNCH, 0, size)
        left = libc.cachestat_pages(fd, 0, size)
    if grown == pages and left == 0:
        return "allocated, then freed"
    return f"the file held {grown} of {pages} pages after fallocate, {left} after the punch"


def _fallocate_by_meminfo(fd: int, size: int) -> str:
    start = _meminfo_kib("Cached")
    libc.fallocate(fd, KEEP, 0, size)
    grown = _meminfo_kib("Cached") - start
    libc.fallocate(fd, PUNCH, 0, size)
    shrunk = _meminfo_kib("Cached") - start
    wanted = (size >> 10) * 9 // 10
    if grown >= wanted and shrunk <= (size >> 10) // 10:
        return "allocated, then freed"
    return f"Cached grew {grown} KiB, then ended {shrunk:+} KiB"


# -- binding to memory slots ----------------------------------------------------------------
def bind_unaligned() -> str:
    with bench_vm() as vm, gmem(vm) as fd:
        return all_same(
            [
                outcome(lambda: bind(vm, 0, 0, PAGE, fd, offset=1)),
                outcome(lambda: bind(vm, 1, 0x100000, PAGE - 1, fd)),
                outcome(lambda: bind(vm, 2, 0x200001, PAGE, fd)),
            ]
        )


def bind_beyond_file() -> str:
    with bench_vm() as vm, gmem(vm) as fd:
        return all_same(
            [
                outcome(lambda: bind(vm, 0, 0, 2 * SIZE, fd)),
                outcome(lambda: bind(vm, 1, 0x100000, SIZE, fd, offset=PAGE)),
            ]
        )


def bind_gpa_overlap() -> str:
    with bench_vm() as vm, gmem(vm, 2 * SIZE) as fd:
        bind(vm, 0, 0, SIZE, fd)
        return outcome(lambda: bind(vm, 1, PAGE, SIZE, fd, offset=SIZE))


def bind_same_range_twice() -> str:
    with bench_vm() as vm, gmem(vm) as fd:
        bind(vm, 0, 0, SIZE, fd)
        return outcome(lambda: bind(vm, 1, 0x100000, SIZE, fd))


def bind_two_offsets() -> str:
    with bench_vm() as vm, gmem(vm, 2 * SIZE) as fd:
        return all_same(
            [
                outcome(lambda: bind(vm, 0, 0, SIZE, fd)),
                outcome(lambda: bind(vm, 1, 0x100000, SIZE, fd, offset=SIZE)),
            ]
        )


def bind_with_other_flags() -> str:
    with bench_vm() as vm, gmem(vm) as fd:
        return all_same(
            [
                outcome(
                    lambda: bind(
                        vm, 0, 0, SIZE, fd, flags=KVM_MEM_GUEST_MEMFD | KVM_MEM_LOG_DIRTY_PAGES
                    )
                ),
                outcome(
                    lambda: bind(vm, 1, 0, SIZE, fd, flags=KVM_MEM_GUEST_MEMFD | KVM_MEM_READONLY)
                ),
            ]
        )


def bind_v1_ioctl() -> str:
    with bench_vm() as vm:
        return outcome(lambda: vm.set_user_memory_region(0, 0, SIZE, 0, KVM_MEM_GUEST_MEMFD))


def bind_other_vm() -> str:
    with bench_vm() as vm, gmem(vm) as fd, Kvm() as kvm, kvm.create_vm() as other:
        return outcome(lambda: bind(other, 0, 0, SIZE, fd))


def fd_outlives_vm() -> str:
    """Close the VM and /dev/kvm fds; the guest_memfd still maps, holds data, punches."""
    kvm = Kvm()
    vm = kvm.create_vm()
    fd = vm.create_guest_memfd(SIZE, MMAP_SHARED)
    vm.close()
    kvm.close()
    try:
        with mapped(fd) as addr:
            ctypes.memset(addr, 0x5A, SIZE)
            libc.fallocate(fd, PUNCH, 0, PAGE)
            data = ctypes.string_at(addr, SIZE)
            return "ok" if data == bytes(PAGE) + b"\x5a" * (SIZE - PAGE) else "data wrong"
    finally:
        os.close(fd)


# -- a running guest -------------------------------------------------------------------------
PORT_DISCARD_PROBE = 0x510


@dataclass(frozen=True)
class _NoState:
    pass


class _DiscardOnWrite:
    name = "discard-probe"
    state_version = 1
    state_type = _NoState

    def __init__(self, discard: Callable[[], None]) -> None:
        self.discard = discard

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        self.discard()

    def save_state(self) -> _NoState:
        return _NoState()


def guest_sees_zeros_after_punch() -> str:
    """The guest writes a word; the host punches its page; the guest reads it back."""
    from kvmkit.machine import MachineConfig, build_for_boot

    target = 0x800000
    config = MachineConfig(
        guest="discard_probe",
        memory_bytes=16 << 20,
        memory_backend="guest_memfd",
        guest_arg=target,
        console="none",
    )
    with build_for_boot(config, console=io.BytesIO()) as m:
        assert m.memory is not None
        memory = m.memory
        m.pio_bus.add(PORT_DISCARD_PROBE, 1, _DiscardOnWrite(lambda: memory.discard(target, PAGE)))
        result = m.run()
    if result.status == 0:
        return "zeros"
    if result.status == 1:
        return "old data"
    return f"run failed: {result.reason}"


def guest_without_host_mapping() -> str:
    """Upstream serves a guest_memfd slot with no userspace address from the file."""
    result = gmem_probe(host_mapped=False)
    return "ok" if result.ok else result.detail


def _pvm_deviation() -> tuple[str, str] | None:
    if os.path.isdir("/sys/module/kvm_pvm"):
        return (
            "the guest stopped with INTERNAL_ERROR",
            "PVM reaches guest_memfd through the slot's userspace address",
        )
    return None


CHECKS: list[Check] = [
    Check("create.size_zero", "size 0 is refused", "EINVAL", create_size_zero),
    Check("create.size_unaligned", "sizes 1..4095 are refused", "EINVAL", create_size_unaligned),
    Check(
        "create.flags",
        "each flag bit accepted iff KVM_CAP_GUEST_MEMFD_FLAGS has it",
        "as the capability says",
        create_flags_per_capability,
    ),
    Check(
        "create.reserved",
        "non-zero reserved fields are not checked (6.18)",
        "ok",
        create_reserved_ignored,
    ),
    Check(
        "create.no_direct_map",
        "NO_DIRECT_MAP refused where the capability lacks it",
        "EINVAL",
        create_no_direct_map,
    ),
    Check(
        "create.multiple",
        "two files get their own sizes and inodes",
        "distinct files",
        create_multiple,
    ),
    Check("file.read_write", "read() and write() are refused", "EINVAL", file_read_write),
    Check(
        "file.pread_pwrite",
        "pread(), pwrite() and lseek() are refused",
        "ESPIPE",
        file_pread_pwrite,
    ),
    Check("file.size_fixed", "ftruncate cannot resize the file", "EINVAL", file_size_fixed),
    Check(
        "mmap.without_flag",
        "mmap without GUEST_MEMFD_FLAG_MMAP is refused",
        "ENODEV",
        mmap_without_flag,
    ),
    Check("mmap.private", "MAP_PRIVATE (copy-on-write) is refused", "EINVAL", mmap_private),
    Check(
        "mmap.shared", "MAP_SHARED round-trips; a punched page reads zero", "ok", mmap_shared_punch
    ),
    Check(
        "mmap.private_memory",
        "touching memory that starts private raises",
        "SIGBUS",
        mmap_private_memory_sigbus,
    ),
    Check(
        "mmap.beyond_file",
        "touching past the end of the file raises",
        "SIGBUS",
        mmap_beyond_file_sigbus,
    ),
    Check("mmap.collapse", "MADV_COLLAPSE cannot build a huge folio", "EINVAL", mmap_no_collapse),
    Check("mmap.mbind", "mbind policy reads back; a bad policy is refused", "ok", mmap_mbind),
    Check(
        "fallocate.mode0", "fallocate without KEEP_SIZE is refused", "EOPNOTSUPP", fallocate_mode0
    ),
    Check(
        "fallocate.keep_size",
        "fallocate(KEEP_SIZE) inside the file works",
        "ok",
        fallocate_keep_size,
    ),
    Check(
        "fallocate.beyond_end",
        "fallocate at or past the end is refused",
        "EINVAL",
        fallocate_beyond_end,
    ),
    Check("punch.beyond_end", "punching at or past the end succeeds", "ok", punch_beyond_end),
    Check(
        "punch.unaligned",
        "unaligned punch offsets and lengths are refused",
        "EINVAL",
        punch_unaligned,
    ),
    Check("punch.zero_range", "FALLOC_FL_ZERO_RANGE is refused", "EOPNOTSUPP", zero_range),
    Check("punch.frees", "a punch returns touched pages to the host", "freed", punch_frees_memory),
    Check(
        "fallocate.allocates",
        "fallocate takes 64 MiB of host memory; a punch returns it",
        "allocated, then freed",
        fallocate_allocates,
    ),
    Check(
        "bind.unaligned", "unaligned offset, size or address is refused", "EINVAL", bind_unaligned
    ),
    Check(
        "bind.beyond_file", "a slot past the end of the file is refused", "EINVAL", bind_beyond_file
    ),
    Check(
        "bind.gpa_overlap",
        "slots overlapping in guest memory are refused",
        "EEXIST",
        bind_gpa_overlap,
    ),
    Check(
        "bind.same_range",
        "one file range bound by two slots is refused (EEXIST from 7.2)",
        "EINVAL",
        bind_same_range_twice,
    ),
    Check(
        "bind.two_offsets",
        "one file bound by two slots at different offsets",
        "ok",
        bind_two_offsets,
    ),
    Check(
        "bind.other_flags",
        "GUEST_MEMFD with LOG_DIRTY_PAGES or READONLY is refused",
        "EINVAL",
        bind_with_other_flags,
    ),
    Check(
        "bind.v1_ioctl",
        "KVM_MEM_GUEST_MEMFD through the v1 ioctl is refused",
        "EINVAL",
        bind_v1_ioctl,
    ),
    Check("bind.other_vm", "a file bound in another VM is refused", "EINVAL", bind_other_vm),
    Check(
        "lifetime.outlives_vm",
        "the fd works after the VM and /dev/kvm fds close",
        "ok",
        fd_outlives_vm,
    ),
    Check(
        "guest.after_punch",
        "a running guest reads zeros after a host punch",
        "zeros",
        guest_sees_zeros_after_punch,
    ),
    Check(
        "guest.no_host_mapping",
        "a guest runs from a slot with no host mapping",
        "ok",
        guest_without_host_mapping,
        deviation=_pvm_deviation(),
    ),
]
