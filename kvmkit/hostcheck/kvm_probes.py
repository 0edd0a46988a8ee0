"""Facts from /dev/kvm itself: every capability, VM types, guest_memfd flags, limits,
CPUID and MSRs, then functional probes where a capability can lie or be partial.

Each probe creates what it tests, cleans up, and returns ok/detail; a probe that runs
guest code is kicked out after a time limit."""

import contextlib
import ctypes
import errno
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

from kvmkit import libc
from kvmkit.arch.x86.cpuid_features import decode_features, pmu_version
from kvmkit.arch.x86.guest_cpuid import linux_cpuid
from kvmkit.arch.x86.real_mode import real_mode_regs, real_mode_sregs
from kvmkit.errors import KvmkitError
from kvmkit.hostcheck.host_facts import host_facts, module_params
from kvmkit.hostcheck.probes import guest_memfd_runs_unmapped, run_with_timeout
from kvmkit.kvm import Kvm, KvmError, Vm
from kvmkit.kvm.system import VM_TYPE_NAMES
from kvmkit.kvm.vm import describe_gmem_flags
from kvmkit.memory.userfault import Userfaultfd
from kvmkit.uapi.caps import Cap
from kvmkit.uapi.exits import ExitReason
from kvmkit.uapi.memory import (
    GUEST_MEMFD_FLAG_INIT_SHARED,
    GUEST_MEMFD_FLAG_MMAP,
    KVM_MEM_GUEST_MEMFD,
    KVM_MEM_LOG_DIRTY_PAGES,
)

SCHEMA = "kvmkit-check/1"
PAGE = 4096
PROBE_MEM = 64 << 10
CODE_GPA, DATA_GPA = 0x1000, 0x3000
# mov byte [0x3000], 1; hlt   (16-bit real mode): one store to page 3, then an exit
STORE_CODE = bytes([0xC6, 0x06, 0x00, 0x30, 0x01, 0xF4])

Probe = Callable[[Kvm], tuple[bool, str]]


def kvm_facts(kvm: Kvm) -> dict[str, Any]:
    caps = {cap.name: kvm.check_extension(cap) for cap in Cap}
    supported = kvm.supported_cpuid()
    gmem = caps["GUEST_MEMFD_FLAGS"] if caps["GUEST_MEMFD"] else 0
    return {
        "api_version": kvm.api_version,
        "caps": caps,
        "vm_types": kvm.vm_types(),
        "guest_memfd_flags": {"value": gmem, "names": describe_gmem_flags(gmem).split("|")},
        "limits": {
            "max_vcpus": caps["MAX_VCPUS"],
            "recommended_vcpus": caps["NR_VCPUS"],
            "memslots": caps["NR_MEMSLOTS"],
            "dirty_ring_bytes": caps["DIRTY_LOG_RING"],
        },
        "cpuid_features": decode_features(supported),
        "pmu_version": pmu_version(supported),
        "msrs": [f"{i:#x}" for i in kvm.msr_index_list()],
    }


# -- functional probes ------------------------------------------------------------------
@contextlib.contextmanager
def _mapping(fd: int, size: int) -> Iterator[int]:
    addr = libc.mmap(size, libc.PROT_READ | libc.PROT_WRITE, libc.MAP_SHARED, fd)
    try:
        yield addr
    finally:
        libc.munmap(addr, size)


def _run_store_guest(vm: Vm, slot_flags: int, uaddr: int, **gmem: int) -> tuple[bool, str]:
    """Bind [0, PROBE_MEM) at uaddr, run one store to DATA_GPA, read the dirty log."""
    ctypes.memmove(uaddr + CODE_GPA, STORE_CODE, len(STORE_CODE))
    vm.set_user_memory_region2(0, 0, PROBE_MEM, uaddr, flags=slot_flags, **gmem)
    vcpu = vm.create_vcpu(0)
    vcpu.set_sregs(real_mode_sregs(vcpu.get_sregs(), CODE_GPA))
    vcpu.set_regs(real_mode_regs(CODE_GPA))
    reason = run_with_timeout(vcpu)
    if reason != ExitReason.HLT:
        return False, f"the probe guest stopped with {ExitReason.name_of(reason)}"
    bitmap = vm.get_dirty_log(0, PROBE_MEM // PAGE)
    dirty = [p for p in range(PROBE_MEM // PAGE) if bitmap[p // 8] >> (p % 8) & 1]
    if DATA_GPA // PAGE not in dirty:
        return False, f"the guest's store to page {DATA_GPA // PAGE} was not logged ({dirty})"
    return True, f"the guest's store was logged (dirty pages {dirty})"


def probe_dirty_log_memfd(kvm: Kvm) -> tuple[bool, str]:
    fd = os.memfd_create("kvmkit-check", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, PROBE_MEM)
        with kvm.create_vm() as vm, _mapping(fd, PROBE_MEM) as addr:
            return _run_store_guest(vm, KVM_MEM_LOG_DIRTY_PAGES, addr)
    finally:
        os.close(fd)


def probe_dirty_log_gmem_view(kvm: Kvm) -> tuple[bool, str]:
    """A plain, dirty-logged slot over a guest_memfd mapping: the basis of live
    migration of guest_memfd memory."""
    with kvm.create_vm() as vm:
        fd = vm.create_guest_memfd(PROBE_MEM, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED)
        try:
            with _mapping(fd, PROBE_MEM) as addr, _mapping(fd, PROBE_MEM) as second:
                ok, detail = _run_store_guest(vm, KVM_MEM_LOG_DIRTY_PAGES, addr)
                seen = ctypes.c_uint8.from_address(second + DATA_GPA).value
                if ok and seen != 1:
                    return False, "the store was logged but a second mapping does not see it"
                return ok, detail + ("; a second guest_memfd mapping sees the store" if ok else "")
        finally:
            os.close(fd)


def probe_dirty_log_gmem_slot(kvm: Kvm) -> tuple[bool, str]:
    """Does KVM dirty-log a guest_memfd slot itself? (upstream 6.18: no, EINVAL)"""
    with kvm.create_vm() as vm:
        fd = vm.create_guest_memfd(PROBE_MEM, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED)
        try:
            with _mapping(fd, PROBE_MEM) as addr:
                vm.set_user_memory_region2(
                    0,
                    0,
                    PROBE_MEM,
                    addr,
                    flags=KVM_MEM_GUEST_MEMFD | KVM_MEM_LOG_DIRTY_PAGES,
                    guest_memfd=fd,
                )
                return True, "KVM accepted GUEST_MEMFD|LOG_DIRTY_PAGES on one slot"
        except KvmError as e:
            return False, f"GUEST_MEMFD|LOG_DIRTY_PAGES on one slot: {errno.errorcode.get(e.errno)}"
        finally:
            os.close(fd)


def probe_dirty_ring(kvm: Kvm) -> tuple[bool, str]:
    for cap in (Cap.DIRTY_LOG_RING_ACQ_REL, Cap.DIRTY_LOG_RING):
        size = kvm.check_extension(cap)
        if size:
            with kvm.create_vm() as vm:
                vm.enable_cap(cap, 64 << 10)
            return True, f"enabled {cap.name} with a 64 KiB ring per vCPU (max {size} bytes)"
    return False, "KVM_CAP_DIRTY_LOG_RING(_ACQ_REL) is 0"


def probe_guest_memfd_flags(kvm: Kvm) -> tuple[bool, str]:
    """Create a guest_memfd with each reported flag; map and touch it where MMAP."""
    if not kvm.check_extension(Cap.GUEST_MEMFD):
        return False, "KVM_CAP_GUEST_MEMFD is 0"
    flags = kvm.check_extension(Cap.GUEST_MEMFD_FLAGS)
    mappable = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED
    done = []
    with kvm.create_vm() as vm:
        for bit in [0] + [1 << b for b in range(64) if flags >> b & 1]:
            # MMAP is tried with INIT_SHARED where offered, so the mapping can be touched.
            asked = bit | (
                flags & GUEST_MEMFD_FLAG_INIT_SHARED if bit == GUEST_MEMFD_FLAG_MMAP else 0
            )
            try:
                fd = vm.create_guest_memfd(PROBE_MEM, asked)
            except KvmError as e:
                return False, f"flags {describe_gmem_flags(asked)} were reported but refused: {e}"
            try:
                if asked & mappable == mappable:
                    with _mapping(fd, PROBE_MEM) as addr:
                        ctypes.memset(addr, 0x5A, PAGE)
                        if ctypes.c_uint8.from_address(addr).value != 0x5A:
                            return False, "a mapped guest_memfd did not keep a host write"
            finally:
                os.close(fd)
            done.append(describe_gmem_flags(asked))
    return True, "created: " + ", ".join(done) + "; mapped and wrote where MMAP"


def probe_vm_types(kvm: Kvm) -> tuple[bool, str]:
    names = {v: k for k, v in VM_TYPE_NAMES.items()}
    made, failed = [], []
    for name in kvm.vm_types():
        try:
            with kvm.create_vm(names.get(name, 0)):
                made.append(name)
        except KvmError as e:
            failed.append(f"{name} ({errno.errorcode.get(e.errno)})")
    if failed:
        return False, f"reported but not creatable: {', '.join(failed)}"
    return True, f"created: {', '.join(made)}"


XSAVE_BIT = 1 << 26  # CPUID leaf 1 ECX


def probe_cpuid_honoured(kvm: Kvm) -> tuple[bool, str]:
    """Does a vCPU's CPUID follow KVM_SET_CPUID2? Set leaf 1 with XSAVE cleared and
    read it back: PVM hosts answer from the CPU itself."""
    supported = kvm.supported_cpuid()
    with kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        vcpu.set_cpuid(linux_cpuid(supported, 0, 1, ("xsave",)))
        leaf1 = next((e for e in vcpu.get_cpuid() if e.function == 1), None)
    if leaf1 is None:
        return False, "no CPUID leaf 1 reads back"
    if leaf1.ecx & XSAVE_BIT:
        return False, (
            f"leaf 1 reads back ECX {leaf1.ecx:#x} with XSAVE set after the VMM cleared it:"
            " the VMM cannot hide CPU features from a guest"
        )
    return True, "the vCPU's CPUID is what the VMM set"


def probe_tsc_khz(kvm: Kvm) -> tuple[bool, str]:
    with kvm.create_vm() as vm:
        khz = vm.create_vcpu(0).get_tsc_khz()
    return khz > 0, f"KVM_GET_TSC_KHZ = {khz} kHz (kvmkit passes it as tsc_early_khz=)"


def probe_irqchip(kvm: Kvm) -> tuple[bool, str]:
    with kvm.create_vm() as vm:
        vm.create_irqchip()
        vm.create_pit2()
        vm.get_irqchip(0)
        vm.get_pit2()
    return True, "in-kernel PIC/IOAPIC and PIT created and read back"


def probe_userfaultfd(kvm: Kvm) -> tuple[bool, str]:
    uffd = Userfaultfd()
    try:
        fd = os.memfd_create("kvmkit-check", os.MFD_CLOEXEC)
        os.ftruncate(fd, PROBE_MEM)
        try:
            with _mapping(fd, PROBE_MEM) as addr:
                uffd.register(addr, PROBE_MEM)
                uffd.unregister(addr, PROBE_MEM)
        finally:
            os.close(fd)
        with kvm.create_vm() as vm:
            gfd = vm.create_guest_memfd(
                PROBE_MEM, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED
            )
            try:
                with _mapping(gfd, PROBE_MEM) as addr:
                    try:
                        uffd.register(addr, PROBE_MEM)
                        gmem = "guest_memfd mappings too"
                    except OSError as e:
                        gmem = f"not on guest_memfd mappings ({errno.errorcode.get(e.errno or 0)})"
            finally:
                os.close(gfd)
    except KvmError:
        gmem = "guest_memfd not tested (no mappable guest_memfd)"
    finally:
        uffd.close()
    return True, f"missing-mode registration works on memfd mappings; {gmem}"


def probe_vpmu(kvm: Kvm) -> tuple[bool, str]:
    if module_params("kvm", ("enable_pmu",)).get("enable_pmu", "Y") in ("N", "0"):
        return False, "the kvm module has enable_pmu=N: guests get no vPMU"
    version = pmu_version(kvm.supported_cpuid())
    if not version:
        return False, "KVM_GET_SUPPORTED_CPUID offers no architectural PMU (leaf 0xA version 0)"
    return True, f"CPUID leaf 0xA offers PMU version {version}"


def probe_guest_memfd_unmapped(kvm: Kvm) -> tuple[bool, str]:
    result = guest_memfd_runs_unmapped()
    return result.ok, result.detail


PROBES: dict[str, tuple[str, Probe]] = {
    "guest_memfd_flags": (
        "guest_memfd with each reported flag, mapped where MMAP",
        probe_guest_memfd_flags,
    ),
    "vm_types": ("a VM of each reported type", probe_vm_types),
    "dirty_log_memfd": ("dirty logging of a guest store, plain memfd slot", probe_dirty_log_memfd),
    "dirty_log_gmem_view": (
        "dirty logging on a plain slot over guest_memfd pages",
        probe_dirty_log_gmem_view,
    ),
    "dirty_log_gmem_slot": (
        "dirty logging on a guest_memfd slot itself",
        probe_dirty_log_gmem_slot,
    ),
    "dirty_ring": ("enable the dirty ring", probe_dirty_ring),
    "irqchip": ("in-kernel irqchip and PIT", probe_irqchip),
    "cpuid_honoured": ("a vCPU's CPUID follows KVM_SET_CPUID2", probe_cpuid_honoured),
    "tsc_khz": ("the vCPU's TSC frequency from KVM_GET_TSC_KHZ", probe_tsc_khz),
    "userfaultfd": ("userfaultfd missing mode on guest memory", probe_userfaultfd),
    "vpmu": ("a virtual PMU for guests", probe_vpmu),
    "guest_memfd_unmapped": (
        "a guest runs from guest_memfd with no host mapping",
        probe_guest_memfd_unmapped,
    ),
}


def run_probes(kvm: Kvm, names: list[str] | None = None) -> dict[str, dict[str, Any]]:
    out = {}
    for name, (title, probe) in PROBES.items():
        if names is not None and name not in names:
            continue
        start = time.monotonic()
        try:
            ok, detail = probe(kvm)
        except (KvmkitError, OSError) as e:
            ok, detail = False, str(e)
        out[name] = {
            "title": title,
            "ok": ok,
            "detail": detail,
            "seconds": round(time.monotonic() - start, 4),
        }
    return out


def gather(probes: bool = True) -> dict[str, Any]:
    """Every fact `kvmkit check` reports, as one JSON-able dict (schema SCHEMA)."""
    facts: dict[str, Any] = {
        "schema": SCHEMA,
        "captured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": host_facts(),
    }
    if not facts["host"]["dev_kvm"]["accessible"]:
        facts["kvm"] = None
        facts["probes"] = {}
        return facts
    with Kvm() as kvm:
        facts["kvm"] = kvm_facts(kvm)
        facts["probes"] = run_probes(kvm) if probes else {}
    return facts
