"""`Vcpu`: a KVM vCPU fd, its kvm_run mapping, and every piece of its state."""

import contextlib
import ctypes
import errno
import fcntl
import os
import signal
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, TypeVar

from kvmkit import faults, libc
from kvmkit.closing import Closeable
from kvmkit.kvm.errors import KvmError
from kvmkit.kvm.exits import EXIT_REASON_WORD, INTR, ExitDecoder
from kvmkit.kvm.guest_events import deliver
from kvmkit.kvm.ioctl import kvm_ioctl
from kvmkit.kvm.system import read_cpuid
from kvmkit.uapi import ioctls
from kvmkit.uapi.cpu import (
    kvm_cpuid2,
    kvm_cpuid_entry2,
    kvm_debugregs,
    kvm_fpu,
    kvm_guest_debug,
    kvm_lapic_state,
    kvm_mp_state,
    kvm_msr_entry,
    kvm_msrs,
    kvm_regs,
    kvm_sregs,
    kvm_sregs2,
    kvm_translation,
    kvm_vcpu_events,
    kvm_x86_mce,
    kvm_xcrs,
    kvm_xsave,
)
from kvmkit.uapi.memory import KVM_DIRTY_LOG_PAGE_OFFSET
from kvmkit.uapi.run import kvm_run

if TYPE_CHECKING:
    from kvmkit.kvm.vm import Vm

S = TypeVar("S", bound=ctypes.Structure)

KICK_SIGNAL = signal.SIGUSR1
PAGE_BYTES = 4096


def _ignore_kick(signum: int, frame: object) -> None:
    """A kick only needs to interrupt KVM_RUN with EINTR; nothing to do here."""


def install_kick_handler() -> bool:
    """Install (once, for the life of the process) a no-op KICK_SIGNAL handler, so
    `Vcpu.kick` interrupts KVM_RUN instead of killing the process. Python sets handlers
    only on the main thread: elsewhere this returns False unless it is already in place,
    and kicks then rely on immediate_exit alone (a guest spinning without exits is not
    interrupted)."""
    if signal.getsignal(KICK_SIGNAL) is _ignore_kick:
        return True
    if threading.current_thread() is not threading.main_thread():
        return False
    signal.signal(KICK_SIGNAL, _ignore_kick)
    return True


@contextlib.contextmanager
def kick_handler() -> Iterator[bool]:
    """`install_kick_handler()` as a context: yields whether kicks can interrupt KVM_RUN."""
    yield install_kick_handler()


class Vcpu(Closeable):
    """A vCPU fd with its kvm_run page mapped.

    `run_struct` is the live `kvm_run`; `run_page` is a writable memoryview of the
    whole mapping (kvm_run, the PIO data page, the coalesced MMIO ring), `run_words`
    the same seen as u32 words (the exit reason is one). Where the VM
    has a dirty ring, `dirty_ring` is a writable view of this vCPU's ring as u64 words
    (two per `kvm_dirty_gfn`: flags | slot << 32, then the page offset in the slot).
    """

    def __init__(
        self, vm: "Vm", index: int, fd: int, mmap_size: int, dirty_ring_bytes: int = 0
    ) -> None:
        self.vm = vm
        self.index = index
        self.fd = fd
        self.mmap_size = mmap_size
        self.mce_ready = False  # KVM_X86_SETUP_MCE done (see faults/guest_events.py)
        self.dirty_ring_bytes = 0
        self.dirty_ring: memoryview | None = None
        try:
            self.run_addr = libc.mmap(
                mmap_size, libc.PROT_READ | libc.PROT_WRITE, libc.MAP_SHARED, fd
            )
        except OSError as e:
            raise KvmError("mmap(vcpu fd)", e.errno or 0, "cannot map kvm_run") from None
        self.run_struct = kvm_run.from_address(self.run_addr)
        self.run_page = memoryview((ctypes.c_char * mmap_size).from_address(self.run_addr)).cast(
            "B"
        )
        self.run_words = self.run_page.cast("I")
        if dirty_ring_bytes:
            self._map_dirty_ring(dirty_ring_bytes)

    def _map_dirty_ring(self, size_bytes: int) -> None:
        try:
            self.ring_addr = libc.mmap(
                size_bytes,
                libc.PROT_READ | libc.PROT_WRITE,
                libc.MAP_SHARED,
                self.fd,
                KVM_DIRTY_LOG_PAGE_OFFSET * PAGE_BYTES,
            )
        except OSError as e:  # the caller closes the fd
            self.run_page.release()
            libc.munmap(self.run_addr, self.mmap_size)
            raise KvmError(
                "mmap(vcpu fd, dirty ring)", e.errno or 0, "cannot map the vCPU's dirty ring"
            ) from None
        self.dirty_ring_bytes = size_bytes
        raw = (ctypes.c_char * size_bytes).from_address(self.ring_addr)
        self.dirty_ring = memoryview(raw).cast("B").cast("Q")

    # -- lifecycle --------------------------------------------------------
    def close(self) -> None:
        if self.fd < 0:
            return
        if self.dirty_ring is not None:
            self.dirty_ring.release()
            self.dirty_ring = None
            libc.munmap(self.ring_addr, self.dirty_ring_bytes)
        self.run_words.release()
        self.run_page.release()
        libc.munmap(self.run_addr, self.mmap_size)
        os.close(self.fd)
        self.fd = -1

    # -- running ----------------------------------------------------------
    def run(self) -> int:
        """KVM_RUN once; returns the exit reason. EINTR (a kick) returns KVM_EXIT_INTR."""
        return self.runner()()

    def runner(self) -> Callable[[], int]:
        """KVM_RUN as a prebound callable returning the exit reason: KVM_EXIT_INTR when
        a kick interrupted it (EINTR, EAGAIN); KvmError for any other failure. This is
        the one KVM_RUN call site. The fault plan is consulted only when one is active
        at the time of this call, so a run without a plan pays nothing: a planned errno
        fails the call as the kernel would; a planned guest event is delivered just
        before the vCPU enters."""
        # fcntl.ioctl with no argument passes 0 and is ~0.3 us cheaper than ctypes; it
        # never retries EINTR itself (test_ctrl_c_stops_the_machine_with_130 kicks a guest
        # spinning with no exits).
        ioctl, fd, request = fcntl.ioctl, self.fd, ioctls.KVM_RUN
        words, reason_at = self.run_words, EXIT_REASON_WORD
        interrupted = (errno.EINTR, errno.EAGAIN)

        def run_once() -> int:
            try:
                ioctl(fd, request)
            except OSError as e:
                if e.errno in interrupted:
                    return INTR
                raise KvmError("KVM_RUN", e.errno or 0) from None
            return words[reason_at]

        if faults.active() is None:
            return run_once

        def run_with_plan() -> int:
            rule = faults.planned_rule("ioctl:KVM_RUN")
            if rule is not None:
                if rule.event is not None:
                    deliver(self, rule.event)
                elif err := faults.errno_after_delay(rule):
                    if err in interrupted:
                        return INTR
                    raise KvmError("KVM_RUN", err, "fault injected by the plan")
            return run_once()

        return run_with_plan

    def exit_decoder(self) -> ExitDecoder:
        """A decoder of this vCPU's exits (see kvmkit/kvm/exits.py)."""
        return ExitDecoder(self.run_page)

    def deliver(self, event: "faults.GuestEvent") -> None:
        """Make a guest-visible fault happen at the vCPU's next KVM_RUN."""
        deliver(self, event)

    def kick(self, thread_ident: int | None) -> None:
        """Make the thread running this vCPU leave KVM_RUN (inside `kick_handler`):
        immediate_exit stops a thread about to enter, the signal one already inside.
        Pass None for the calling thread, which needs no signal."""
        if self.fd >= 0:
            self.run_struct.immediate_exit = 1
        if thread_ident is not None and signal.getsignal(KICK_SIGNAL) not in (
            signal.SIG_DFL,
            None,
        ):  # without a handler (run outside the main thread) the signal would kill us
            with contextlib.suppress(ProcessLookupError, OSError):
                signal.pthread_kill(thread_ident, KICK_SIGNAL)

    # -- state ------------------------------------------------------------
    def _get(self, request: int, cls: type[S]) -> S:
        value = cls()
        kvm_ioctl(self.fd, request, value)
        return value

    def get_regs(self) -> kvm_regs:
        return self._get(ioctls.KVM_GET_REGS, kvm_regs)

    def set_regs(self, regs: kvm_regs) -> None:
        kvm_ioctl(self.fd, ioctls.KVM_SET_REGS, regs)

    def get_sregs(self) -> kvm_sregs:
        return self._get(ioctls.KVM_GET_SREGS, kvm_sregs)

    def set_sregs(self, sregs: kvm_sregs) -> None:
        kvm_ioctl(self.fd, ioctls.KVM_SET_SREGS, sregs)

    def get_sregs2(self) -> kvm_sregs2:
        return self._get(ioctls.KVM_GET_SREGS2, kvm_sregs2)

    def set_sregs2(self, sregs: kvm_sregs2) -> None:
        kvm_ioctl(self.fd, ioctls.KVM_SET_SREGS2, sregs)

    def get_fpu(self) -> kvm_fpu:
        return self._get(ioctls.KVM_GET_FPU, kvm_fpu)

    def set_fpu(self, fpu: kvm_fpu) -> None:
        kvm_ioctl(self.fd, ioctls.KVM_SET_FPU, fpu)

    def get_xsave(self) -> kvm_xsave:
        return self._get(ioctls.KVM_GET_XSAVE, kvm_xsave)

    def set_xsave(self, xsave: kvm_xsave) -> None:
        kvm_ioctl(self.fd, ioctls.KVM_SET_XSAVE, xsave)

    def get_xcrs(self) -> kvm_xcrs:
        return self._get(ioctls.KVM_GET_XCRS, kvm_xcrs)

    def set_xcrs(self, xcrs: kvm_xcrs) -> None:
        kvm_ioctl(self.fd, ioctls.KVM_SET_XCRS, xcrs)

    def get_lapic(self) -> kvm_lapic_state:
        return self._get(ioctls.KVM_GET_LAPIC, kvm_lapic_state)

    def set_lapic(self, lapic: kvm_lapic_state) -> None:
        kvm_ioctl(self.fd, ioctls.KVM_SET_LAPIC, lapic)

    def get_vcpu_events(self) -> kvm_vcpu_events:
        return self._get(ioctls.KVM_GET_VCPU_EVENTS, kvm_vcpu_events)

    def set_vcpu_events(self, events: kvm_vcpu_events) -> None:
        kvm_ioctl(self.fd, ioctls.KVM_SET_VCPU_EVENTS, events)

    def get_tsc_khz(self) -> int:
        """The vCPU's TSC frequency in kHz (KVM_GET_TSC_KHZ)."""
        return kvm_ioctl(self.fd, ioctls.KVM_GET_TSC_KHZ)

    def get_mp_state(self) -> int:
        return int(self._get(ioctls.KVM_GET_MP_STATE, kvm_mp_state).mp_state)

    def set_mp_state(self, state: int) -> None:
        kvm_ioctl(self.fd, ioctls.KVM_SET_MP_STATE, kvm_mp_state(state))

    def get_debugregs(self) -> kvm_debugregs:
        return self._get(ioctls.KVM_GET_DEBUGREGS, kvm_debugregs)

    def set_debugregs(self, regs: kvm_debugregs) -> None:
        kvm_ioctl(self.fd, ioctls.KVM_SET_DEBUGREGS, regs)

    def set_guest_debug(self, control: int, debugreg: list[int] | None = None) -> None:
        dbg = kvm_guest_debug(control=control)
        for i, value in enumerate(debugreg or []):
            dbg.arch.debugreg[i] = value
        kvm_ioctl(self.fd, ioctls.KVM_SET_GUEST_DEBUG, dbg)

    def nmi(self) -> None:
        kvm_ioctl(self.fd, ioctls.KVM_NMI)

    def setup_mce(self, mcg_cap: int) -> None:
        """Give the vCPU machine-check banks (KVM_X86_SETUP_MCE); `mcg_cap` from
        `Kvm.mce_cap_supported()`. Resets the banks: call once, before `set_mce`."""
        kvm_ioctl(self.fd, ioctls.KVM_X86_SETUP_MCE, ctypes.c_uint64(mcg_cap))

    def set_mce(self, mce: kvm_x86_mce) -> None:
        """Raise a machine check (KVM_X86_SET_MCE): logged in `mce.bank`, and #MC for an
        uncorrected error."""
        kvm_ioctl(self.fd, ioctls.KVM_X86_SET_MCE, mce)

    def translate(self, linear_address: int) -> kvm_translation:
        t = kvm_translation(linear_address=linear_address)
        kvm_ioctl(self.fd, ioctls.KVM_TRANSLATE, t)
        return t

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        """Read MSRs; raises `KvmError` naming the first index KVM refused."""
        buf, entries = _msr_buffer(indices)
        done = kvm_ioctl(self.fd, ioctls.KVM_GET_MSRS, buf)
        if done < len(indices):
            raise KvmError("KVM_GET_MSRS", errno.EINVAL, f"MSR {indices[done]:#x} is not readable")
        return {e.index: e.data for e in entries}

    def set_msrs(self, values: dict[int, int]) -> None:
        indices = list(values)
        buf, entries = _msr_buffer(indices)
        for e in entries:
            e.data = values[e.index]
        done = kvm_ioctl(self.fd, ioctls.KVM_SET_MSRS, buf)
        if done < len(indices):
            raise KvmError("KVM_SET_MSRS", errno.EINVAL, f"MSR {indices[done]:#x} was refused")

    def set_cpuid(self, entries: list[kvm_cpuid_entry2]) -> None:
        size = ctypes.sizeof(kvm_cpuid2) + len(entries) * ctypes.sizeof(kvm_cpuid_entry2)
        buf = (ctypes.c_uint8 * size)()
        kvm_cpuid2.from_buffer(buf).nent = len(entries)
        array = (kvm_cpuid_entry2 * len(entries)).from_buffer(buf, ctypes.sizeof(kvm_cpuid2))
        for i, e in enumerate(entries):
            array[i] = e
        kvm_ioctl(self.fd, ioctls.KVM_SET_CPUID2, buf)

    def get_cpuid(self) -> list[kvm_cpuid_entry2]:
        return read_cpuid(self.fd, ioctls.KVM_GET_CPUID2)


def _msr_buffer(
    indices: list[int],
) -> tuple[ctypes.Array[ctypes.c_uint8], ctypes.Array[kvm_msr_entry]]:
    size = ctypes.sizeof(kvm_msrs) + len(indices) * ctypes.sizeof(kvm_msr_entry)
    buf = (ctypes.c_uint8 * size)()
    kvm_msrs.from_buffer(buf).nmsrs = len(indices)
    entries = (kvm_msr_entry * len(indices)).from_buffer(buf, ctypes.sizeof(kvm_msrs))
    for e, index in zip(entries, indices, strict=True):
        e.index = index
    return buf, entries
