"""Guest memory population and set-up cost per backend, as ratios to memfd.

1. First touch: the built-in `touch` guest (2 vCPUs) writes one word to every page
   of N MiB of RAM; throughput is configured MiB over the run's wall time, for
   guest_memfd, memfd, hugetlb (2 MiB pages, where a pool can be made) and THP
   (memfd + MADV_HUGEPAGE, with shmem THP set to `advise` for the run where
   possible). Each backend is run `--rounds` times, alternating; the median counts.
2. Host-side cost: the time to create, map and bind each backend's memory at 1, 16
   and 64 GiB configured, with nothing touched (it should not grow with size).

On a PVM host the guest's stores are run by KVM's instruction emulator, so the
first-touch numbers include a large, backend-independent emulation cost; the
ratios still show what the backend adds (page allocation and faulting).

    python3 benchmarks/memory_populate.py [--sizes 256,2048] [--rounds 3]

Run as root to let it grow the hugetlb pool and switch shmem THP (both are put
back afterwards).
"""

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing

from kvmkit.kvm import Kvm  # noqa: E402
from kvmkit.machine import MachineConfig, build_for_boot  # noqa: E402
from kvmkit.memory import GuestMemory, choose_backend, ram_regions  # noqa: E402
from kvmkit.memory.exposure import HostMappings  # noqa: E402
from kvmkit.memory.hugepages import SHMEM_THP, HugepagePoolError, read_pool  # noqa: E402

MIB = 1 << 20
GIB = 1 << 30
HUGE = 2 * MIB


@contextlib.contextmanager
def hugetlb_pool(pages: int) -> Iterator[str]:
    """Grow the 2 MiB pool by `pages`; yields "" when ready, else why not."""
    try:
        pool = read_pool(HUGE)
        path = pool.sysfs_dir / "nr_hugepages"
        path.write_text(str(pool.total + pages))
    except (OSError, HugepagePoolError) as e:
        yield f"no pool: {e}"
        return
    try:
        got = read_pool(HUGE).available
        yield "" if got >= pages else f"the host gave {got} of {pages} hugepages"
    finally:
        path.write_text(str(pool.total))


@contextlib.contextmanager
def shmem_thp_advise() -> Iterator[str]:
    """Set shmem THP to `advise` for the run (restored after); yields the mode in force."""
    try:
        before = SHMEM_THP.read_text().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        yield "unavailable"
        return
    try:
        SHMEM_THP.write_text("advise")
        changed = True
    except OSError:
        changed = False
    try:
        yield "advise" if changed else before
    finally:
        if changed:
            SHMEM_THP.write_text(before)


def first_touch_s(backend: str, size: int) -> float:
    config = MachineConfig(
        guest="touch", vcpus=2, memory_bytes=size, memory_backend=backend, console="none"
    )
    with build_for_boot(config) as m:
        result = m.run()
    if result.status != 0:
        sys.exit(f"{backend}: the touch guest failed: {result.reason}")
    return result.wall_s


def create_map_s(kvm: Kvm, backend: str, size: int, repeats: int = 5) -> tuple[float, ...]:
    """Median seconds: GuestMemory(...) whole; then, on a fresh VM, the same steps one by
    one: creating and mapping the file (kvmkit), and binding the slots (KVM)."""
    totals, mine, binds = [], [], []
    for _ in range(repeats):
        with kvm.create_vm() as vm:
            start = time.perf_counter()
            GuestMemory(vm, size, backend).close()
            totals.append(time.perf_counter() - start)
        with kvm.create_vm() as vm:
            t0 = time.perf_counter()
            file = choose_backend(vm, backend).create(vm, size)
            mappings = HostMappings(file.fd, file.map_flags)
            base = mappings.map(0, size, "vmm").addr
            t1 = time.perf_counter()
            for r in ram_regions(size):
                file.bind(vm, r.slot, r.gpa, r.size, r.offset, base + r.offset)
            t2 = time.perf_counter()
            mine.append(t1 - t0)
            binds.append(t2 - t1)
            for r in ram_regions(size):
                vm.delete_memory_region(r.slot)
            mappings.unmap_all()
            file.close()
    return statistics.median(totals), statistics.median(binds), statistics.median(mine)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="256,2048", help="first-touch sizes in MiB")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--configured", default="1,16,64", help="create+map sizes in GiB")
    args = ap.parse_args()
    sizes = [int(s) * MIB for s in args.sizes.split(",")]

    print("first touch (touch guest, 2 vCPUs): MiB/s, ratio to memfd")
    print(f"{'size':>8}  {'backend':<12} {'MiB/s':>8} {'ratio':>6}  note")
    for size in sizes:
        with hugetlb_pool(size // HUGE) as pool_problem, shmem_thp_advise() as thp_mode:
            backends = ["memfd", "guest_memfd", "thp"] + ([] if pool_problem else ["hugetlb"])
            walls: dict[str, list[float]] = {b: [] for b in backends}
            first_touch_s("memfd", 16 * MIB)  # build the guest, warm up
            for _ in range(args.rounds):
                for b in backends:
                    walls[b].append(first_touch_s(b, size))
            base = size / MIB / statistics.median(walls["memfd"])
            for b in ["memfd", "guest_memfd", "hugetlb", "thp"]:
                if b not in walls:
                    print(f"{size // MIB:>6}M  {b:<12} {'-':>8} {'-':>6}  skipped: {pool_problem}")
                    continue
                rate = size / MIB / statistics.median(walls[b])
                note = f"shmem THP: {thp_mode}" if b == "thp" else ""
                print(f"{size // MIB:>6}M  {b:<12} {rate:>8.0f} {rate / base:>6.2f}  {note}")

    print()
    print("host-side create + map + bind, nothing touched: ms, ratio to memfd")
    print(f"{'size':>8}  {'backend':<12} {'total':>8} {'ratio':>6} {'KVM bind':>9} {'kvmkit':>7}")
    with Kvm() as kvm:
        for gib in (int(g) for g in args.configured.split(",")):
            size = gib * GIB
            names = ["memfd", "guest_memfd", "thp"]
            cost = {b: create_map_s(kvm, b, size) for b in names}
            if gib <= 1:
                with hugetlb_pool(size // HUGE) as problem:
                    if not problem:
                        cost["hugetlb"] = create_map_s(kvm, "hugetlb", size)
                        names.append("hugetlb")
            for b in names:
                total, bind, own = cost[b]
                print(
                    f"{gib:>6}G  {b:<12} {total * 1e3:>8.2f} {total / cost['memfd'][0]:>6.2f}"
                    f" {bind * 1e3:>9.2f} {own * 1e3:>7.2f}"
                )
            if "hugetlb" not in names:
                print(
                    f"{gib:>6}G  {'hugetlb':<12} {'-':>8}  skipped: the pool would pin"
                    f" {gib} GiB of host RAM"
                )
    print()
    print("total = GuestMemory(...) and close(); KVM bind = KVM_SET_USER_MEMORY_REGION2 for")
    print("every slot (with shadow paging, tdp_mmu=N, KVM allocates per-page slot metadata,")
    print("so it grows with size, and so does deleting the slots); kvmkit = creating the file")
    print("and mapping it, which does not.")


if __name__ == "__main__":
    main()
