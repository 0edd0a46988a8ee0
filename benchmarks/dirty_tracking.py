"""Dirty tracking for live migration: what one collect costs with KVM's dirty bitmap and
with the per-vCPU dirty ring, for guests of 1 and 16 GiB with 64 to 32768 pages
written since the last collect, measured in the same run; the ratio ring / bitmap
says which is faster where. Each method is also compared with its bare ioctl
(KVM_GET_DIRTY_LOG per slot, KVM_RESET_DIRTY_RINGS) on an empty log.

The pages are written by the dirtier guest (32 per paced round, below the ring's 64
reserved entries: see tests/kvm/test_dirty_tracking.py for what happens above that on
a PVM host), then the collect is timed with the vCPU stopped.

    python3 benchmarks/dirty_tracking.py [--rounds 5]
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing

from kvmkit.machine import MachineConfig, build_for_boot  # noqa: E402
from kvmkit.memory.dirty_log import DirtyLog, run_bytes  # noqa: E402
from kvmkit.memory.layout import GIB, MIB, PAGE_SIZE  # noqa: E402

PER_ROUND = 32
RING_BYTES = 1 << 20  # 65536 entries: every case fits without a ring-full exit


def one(memory: int, pages: int, ring: bool) -> tuple[float, float, float, int]:
    """(collect seconds, empty-collect seconds, bare-ioctl seconds, pages reported)."""
    rounds = max(1, pages // PER_ROUND)
    working_set_mib = max(1, pages * PAGE_SIZE // MIB)
    config = MachineConfig(
        guest="dirtier",
        guest_arg=(rounds << 48) | (working_set_mib << 32) | PER_ROUND,
        memory_bytes=memory,
        console="none",
        dirty_ring_bytes=RING_BYTES if ring else 0,
    )
    with build_for_boot(config) as machine:
        assert machine.memory is not None and machine.vm is not None
        log = DirtyLog(machine.memory, machine.dirty_rings)
        log.start()
        result = machine.run()
        assert result.status == 0, result.reason
        start = time.perf_counter()
        runs = log.collect()
        collect = time.perf_counter() - start
        start = time.perf_counter()
        log.collect()
        empty = time.perf_counter() - start
        start = time.perf_counter()
        if ring:
            machine.vm.reset_dirty_rings()
        else:
            for region in machine.memory.regions:
                machine.vm.get_dirty_log(region.slot, region.size // PAGE_SIZE)
        bare = time.perf_counter() - start
        log.stop()
    return collect, empty, bare, run_bytes(runs) // PAGE_SIZE


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    print(
        f"median of {args.rounds}; collect = the pages written since the last collect, as"
        " byte runs; empty = the next collect, with nothing new"
    )
    print(
        f"{'guest':>6} {'written':>8} | {'bitmap':>9} {'empty':>8} {'ioctl':>8}"
        f" | {'ring':>9} {'empty':>8} {'ioctl':>8} | ring/bitmap"
    )
    for memory in (GIB, 16 * GIB):
        for pages in (64, 4096, 32768):
            rows = {}
            for ring in (False, True):
                samples = [one(memory, pages, ring) for _ in range(args.rounds)]
                collect, empty, bare = (statistics.median(s[i] for s in samples) for i in range(3))
                seen = min(s[3] for s in samples)
                assert seen >= pages, f"only {seen} of {pages} written pages were reported"
                rows[ring] = (collect, empty, bare)
            (bc, be, bb), (rc, re_, rb) = rows[False], rows[True]
            print(
                f"{memory // GIB:>4}G {pages:>8} | {bc * 1e3:7.2f}ms {be * 1e3:6.2f}ms"
                f" {bb * 1e3:6.2f}ms | {rc * 1e3:7.2f}ms {re_ * 1e3:6.2f}ms {rb * 1e3:6.2f}ms"
                f" | {rc / bc:5.2f} (empty {re_ / be:5.2f})"
            )


if __name__ == "__main__":
    main()
