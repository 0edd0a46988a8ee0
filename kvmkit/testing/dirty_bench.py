"""`kvmkit selftest dirty`: dirty tracking as live migration relies on it. A guest
(the dirtier) writes pages at a set pace; every page whose bytes changed between two
collects must be reported, by the bitmap and by the dirty ring, on memfd slots and on
the plain-slot view of guest_memfd."""

import threading
import time

from kvmkit.hostcheck.kvm_probes import probe_dirty_log_gmem_slot
from kvmkit.kvm import Kvm, KvmError
from kvmkit.machine import MachineConfig, build_for_boot
from kvmkit.memory.dirty_log import DirtyLog
from kvmkit.memory.layout import MIB, PAGE_SIZE
from kvmkit.testing.checks import Check, errno_name

RING_BYTES = 64 << 10


class DirtyingGuest:
    """The dirtier guest running on a thread, its dirty log started (a context)."""

    def __init__(self, backend: str, pages_per_ms: int, ring: int = 0) -> None:
        self.machine = build_for_boot(
            MachineConfig(
                guest="dirtier",
                guest_arg=(16 << 32) | pages_per_ms,
                memory_bytes=64 * MIB,
                memory_backend=backend,
                console="none",
                dirty_ring_bytes=ring,
            )
        )
        self.log = DirtyLog(self.machine.memory, self.machine.dirty_rings)  # type: ignore[arg-type]
        self.thread = threading.Thread(target=self.machine.run, daemon=True)

    def __enter__(self) -> "DirtyingGuest":
        self.log.start()  # before the vCPUs run: no pause needed for the slot swap
        self.thread.start()
        while not self.machine.running:
            time.sleep(0.001)
        return self

    def __exit__(self, *exc: object) -> None:
        self.machine.stop(0, "check over")
        self.thread.join(10)
        self.machine.close()


def _missed_pages(backend: str, ring: int) -> str:
    """Collect five times while the guest writes; any changed page not reported?"""
    with DirtyingGuest(backend, 40, ring) as d:
        machine, memory = d.machine, d.machine.memory
        assert memory is not None
        d.log.collect()
        missed = written = 0
        for _ in range(5):
            extents, _ = memory.populated_extents()
            before = {e.offset: bytes(memory.file_view(e.offset, e.length)) for e in extents}
            time.sleep(0.02)
            machine.pause()
            try:
                runs = d.log.collect()
                seen = {p for o, n in runs for p in range(o // PAGE_SIZE, (o + n) // PAGE_SIZE)}
                for offset, data in before.items():
                    now = memory.file_view(offset, len(data))
                    for at in range(0, len(data), PAGE_SIZE):
                        if now[at : at + PAGE_SIZE] != data[at : at + PAGE_SIZE]:
                            written += 1
                            missed += (offset + at) // PAGE_SIZE not in seen
            finally:
                machine.resume()
    if not written:
        return "the guest wrote nothing"
    return "every changed page reported" if not missed else f"{missed} of {written} pages missed"


def _gmem_slot_logging() -> str:
    with Kvm() as kvm:
        ok, detail = probe_dirty_log_gmem_slot(kvm)
    return "accepted" if ok else detail.rsplit(": ", 1)[-1]


def _logging_off() -> str:
    """After logging is turned off, KVM keeps no bitmap for the slots."""
    with DirtyingGuest("memfd", 10) as d:
        d.machine.pause()
        d.log.stop()
        region = d.machine.memory.regions[0]  # type: ignore[union-attr]
        try:
            d.machine.vm.get_dirty_log(region.slot, region.size // PAGE_SIZE)  # type: ignore[union-attr]
        except KvmError as e:
            return errno_name(e.errno)
        finally:
            d.machine.resume()
    return "a bitmap was still returned"


def _ring_overflow() -> str:
    """A guest writing pages with no exit between them, against a 1024-entry ring."""
    with DirtyingGuest("memfd", 0, 16 << 10) as d:
        time.sleep(0.3)
        d.log.collect()
        rings = d.machine.dirty_rings
        assert rings is not None
        if not rings.full_exits:
            return "the ring never filled"
        return "entries lost" if d.log.ring_losses else "no entries lost"


CHECKS: list[Check] = [
    Check(
        "gmem_slot",
        "KVM_MEM_GUEST_MEMFD | KVM_MEM_LOG_DIRTY_PAGES on one slot (6.18 refuses it)",
        "EINVAL",
        _gmem_slot_logging,
    ),
    Check(
        "bitmap.memfd",
        "the bitmap reports every page a running guest changed (memfd slot)",
        "every changed page reported",
        lambda: _missed_pages("memfd", 0),
    ),
    Check(
        "bitmap.gmem_view",
        "the bitmap reports every change on the plain-slot view of guest_memfd",
        "every changed page reported",
        lambda: _missed_pages("guest_memfd", 0),
    ),
    Check(
        "ring.memfd",
        "the dirty ring reports every page a running guest changed (memfd slot)",
        "every changed page reported",
        lambda: _missed_pages("memfd", RING_BYTES),
    ),
    Check(
        "ring.gmem_view",
        "the dirty ring reports every change on the plain-slot view of guest_memfd",
        "every changed page reported",
        lambda: _missed_pages("guest_memfd", RING_BYTES),
    ),
    Check(
        "ring.soft_full",
        "a guest writing without exits is stopped by the ring's soft-full exit in time",
        "no entries lost",
        _ring_overflow,
        deviation=(
            "entries lost",
            "PVM's instruction emulator writes a batch of pages past the soft limit"
            " (kernel WARNING in kvm_dirty_ring_push); kvmkit then resends all memory",
        ),
    ),
    Check(
        "logging_off",
        "with logging off again, KVM_GET_DIRTY_LOG has no bitmap to give",
        "ENOENT",
        _logging_off,
    ),
]
