"""Behaviour probes: questions about the host's KVM that capabilities do not answer,
settled by running a few guest instructions. Each answer is measured once per process."""

import ctypes
import functools
import os
import threading
from dataclasses import dataclass

from kvmkit import libc
from kvmkit.arch.x86.real_mode import real_mode_regs, real_mode_sregs
from kvmkit.kvm import Kvm, KvmError, Vcpu
from kvmkit.kvm.vcpu import kick_handler
from kvmkit.uapi.exits import ExitReason
from kvmkit.uapi.memory import (
    GUEST_MEMFD_FLAG_INIT_SHARED,
    GUEST_MEMFD_FLAG_MMAP,
    KVM_MEM_GUEST_MEMFD,
)

PROBE_MEM = 64 << 10
PROBE_CODE_GPA = 0x1000
PROBE_DATA_GPA = 0x2000
PROBE_PORT = 0x80
PROBE_VALUE = 0x5A
# mov al, [0x2000]; out 0x80, al; hlt   (16-bit real mode)
PROBE_CODE = bytes([0xA0, 0x00, 0x20, 0xE6, PROBE_PORT, 0xF4])
PROBE_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    detail: str


@functools.cache
def guest_memfd_runs_unmapped() -> ProbeResult:
    """Can a guest fetch and load from a guest_memfd slot whose host mapping is gone?

    Upstream KVM serves an mmap-able guest_memfd slot from the file; a PVM host
    reaches guest memory through the slot's userspace address instead.
    """
    return gmem_probe(host_mapped=False)


def gmem_probe(host_mapped: bool) -> ProbeResult:
    """Run 3 real-mode instructions from a guest_memfd slot, with or without a host
    mapping behind the slot's userspace address."""
    with Kvm() as kvm, kvm.create_vm() as vm:
        try:
            fd = vm.create_guest_memfd(
                PROBE_MEM, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED
            )
        except KvmError as e:
            return ProbeResult(False, f"no mappable guest_memfd: {e}")
        addr = 0
        try:
            addr = libc.mmap(PROBE_MEM, libc.PROT_READ | libc.PROT_WRITE, libc.MAP_SHARED, fd)
            ctypes.memmove(addr + PROBE_CODE_GPA, PROBE_CODE, len(PROBE_CODE))
            ctypes.memset(addr + PROBE_DATA_GPA, PROBE_VALUE, 1)
            if not host_mapped:
                libc.munmap(addr, PROBE_MEM)
                addr = 0
            vm.set_user_memory_region2(
                0, 0, PROBE_MEM, addr, flags=KVM_MEM_GUEST_MEMFD, guest_memfd=fd
            )
            vcpu = vm.create_vcpu(0)
            vcpu.set_sregs(real_mode_sregs(vcpu.get_sregs(), PROBE_CODE_GPA))
            vcpu.set_regs(real_mode_regs(PROBE_CODE_GPA))
            reason = run_with_timeout(vcpu)
            io = vcpu.run_struct.exit.io
            if reason == ExitReason.IO and io.port == PROBE_PORT:
                value = vcpu.run_page[io.data_offset]
                if value == PROBE_VALUE:
                    return ProbeResult(True, "the guest ran and read its memory")
                return ProbeResult(False, f"the guest read {value:#x} instead of {PROBE_VALUE:#x}")
            if reason == ExitReason.INTR:
                return ProbeResult(False, f"the guest made no progress in {PROBE_TIMEOUT_S:.0f} s")
            return ProbeResult(False, f"the guest stopped with {ExitReason.name_of(reason)}")
        finally:
            if addr:
                libc.munmap(addr, PROBE_MEM)
            os.close(fd)


def run_with_timeout(vcpu: Vcpu) -> int:
    """vcpu.run(), kicked out after PROBE_TIMEOUT_S (returning KVM_EXIT_INTR) when
    called on the main thread."""
    me = threading.get_ident()
    done = threading.Event()

    def watchdog() -> None:
        if not done.wait(PROBE_TIMEOUT_S):
            vcpu.kick(me)

    with kick_handler() as can_kick:
        if not can_kick:
            return vcpu.run()
        t = threading.Thread(target=watchdog, daemon=True)
        t.start()
        try:
            return vcpu.run()
        finally:
            done.set()
            t.join()
