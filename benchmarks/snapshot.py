"""Snapshot save and restore throughput, as ratios to plain file I/O of the same bytes
on the same file system, measured in the same run.

1. Throughput: a guest with N MiB of RAM touched (filled by the host with a non-zero
   pattern while the counter guest runs, then paused). Save = `Machine.snapshot`
   (pause, capture, write, fsync, rename); restore = `Machine.restore` (verify, build
   the machine, read every chunk straight into guest RAM). References: writing the
   same number of bytes from memory to a file on the same file system plus fsync, and
   reading them back into a fresh mapping. Target: ratio >= 0.8 for both.
2. Scaling: a 16 GiB configured guest with 64 MiB touched against a 128 MiB guest
   with the same 64 MiB touched. Target: within 2x (cost follows touched memory).
3. Lazy restore (memfd): time from calling restore to the guest's first console line,
   for 1 GiB and 8 GiB touched. Target: under 50 ms for both.
4. A Linux guest (the test kernel at its init's prompt): save, and restore to the next
   console line, kvmkit against QEMU (-M microvm; QMP `stop` + migrate to a file, then
   -incoming from it) on the same guest, as ratios.

    python3 benchmarks/snapshot.py [--touched-mib 1024] [--dir /var/tmp] [--skip-lazy]

On a PVM host guest instructions are emulated; none of these numbers include guest
work beyond the counter's few hundred instructions per line.
"""

import argparse
import mmap
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing
sys.path.insert(0, str(HERE))  # qemu_ref

from kvmkit.control.snapshots import restore_snapshot, take_snapshot  # noqa: E402
from kvmkit.machine import Machine, MachineConfig, build_for_boot  # noqa: E402

MIB = 1 << 20
GIB = 1 << 30
FILL_OFFSET = 16 * MIB  # above the counter's pages and image; the boot area is in the top MiB


def fill(machine: Machine, nbytes: int) -> None:
    """Touch `nbytes` of guest RAM from the host with a non-zero, varying pattern,
    from 16 MiB up, skipping the top 16 MiB of low RAM (page tables, GDT, stacks)."""
    block = bytes(range(256)) * (MIB // 256)
    assert machine.memory is not None
    spans = []
    for i, r in enumerate(machine.memory.regions):  # by file offset, past the MMIO gap
        start, end = (
            (r.offset + FILL_OFFSET, r.offset + r.size - FILL_OFFSET)
            if i == 0
            else (r.offset, r.offset + r.size)
        )
        spans.append((start, end))
    left = nbytes
    for start, end in spans:
        for at in range(start, end, MIB):
            if left <= 0:
                return
            n = min(MIB, left, end - at)
            machine.memory.file_view(at, n)[:] = block[:n]
            left -= n
    assert left <= 0, "guest RAM too small for the bytes to touch"


def paused_counter(memory_bytes: int, backend: str, touched: int) -> Machine:
    config = MachineConfig(
        guest="counter",
        guest_arg=0,
        memory_bytes=memory_bytes,
        memory_backend=backend,
        console="none",
    )
    machine = build_for_boot(config)
    start_thread(machine)
    while not machine.running:
        time.sleep(0.001)
    time.sleep(0.02)
    machine.pause()
    fill(machine, touched)
    return machine


_threads: dict[int, threading.Thread] = {}


def start_thread(machine: Machine) -> None:
    t = threading.Thread(target=machine.run, daemon=True)
    _threads[id(machine)] = t
    t.start()


def stop(machine: Machine) -> None:
    machine.stop(0, "benchmark over")
    _threads.pop(id(machine)).join()
    machine.close()


def drop_caches() -> None:
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3")
    except OSError:
        pass


def reference_write(path: Path, nbytes: int) -> float:
    buf = mmap.mmap(-1, nbytes)
    block = bytes(range(256)) * (MIB // 256)
    for at in range(0, nbytes, MIB):
        buf[at : at + MIB] = block[: min(MIB, nbytes - at)]
    start = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    view = memoryview(buf)
    at = 0
    while at < nbytes:
        at += os.write(fd, view[at : at + 64 * MIB])
    os.fsync(fd)
    os.close(fd)
    seconds = time.perf_counter() - start
    view.release()
    buf.close()
    return seconds


def reference_read(path: Path, nbytes: int) -> float:
    start = time.perf_counter()
    buf = mmap.mmap(-1, nbytes)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        at = 0
        while at < nbytes:
            at += f.readinto(view[at : at + 64 * MIB])
    seconds = time.perf_counter() - start
    view.release()
    buf.close()
    return seconds


def settle(*paths: Path) -> None:
    """Remove old files and let the file system finish freeing them (this machine's
    ext4 is mounted with `discard`, so a delete slows the next large write)."""
    for path in paths:
        path.unlink(missing_ok=True)
    os.sync()
    time.sleep(1.0)


def throughput(directory: Path, touched: int, backend: str, rounds: int) -> None:
    snap = directory / "bench.snap"
    ref = directory / "bench.ref"
    saves, restores, ref_w, ref_r = [], [], [], []
    for i in range(rounds):
        machine = paused_counter(2 * GIB, backend, touched)
        nbytes = machine.memory.populated_bytes() if machine.memory else 0
        for turn in (0, 1) if i % 2 == 0 else (1, 0):  # alternate who goes first
            settle(snap if turn == 0 else ref)
            if turn == 0:
                start = time.perf_counter()
                report = take_snapshot(machine, snap)
                saves.append(time.perf_counter() - start)
            else:
                ref_w.append(reference_write(ref, nbytes))
        stop(machine)
        drop_caches()
        start = time.perf_counter()
        restore_snapshot(snap, console="none").close()
        restores.append(time.perf_counter() - start)
        drop_caches()
        ref_r.append(reference_read(ref, nbytes))
    save, restore = statistics.median(saves), statistics.median(restores)
    w, r = statistics.median(ref_w), statistics.median(ref_r)
    print(
        f"\n{backend}, {touched // MIB} MiB touched ({report.file_bytes / MIB:.0f} MiB file),"
        f" median of {rounds}; references move the same populated bytes"
    )
    print(
        f"  save     {save * 1000:7.0f} ms  {nbytes / save / GIB:5.2f} GiB/s"
        f"   reference write+fsync {w * 1000:6.0f} ms   ratio {w / save:.2f}"
    )
    print(
        f"  restore  {restore * 1000:7.0f} ms  {nbytes / restore / GIB:5.2f} GiB/s"
        f"   reference read (cold) {r * 1000:6.0f} ms   ratio {r / restore:.2f}"
    )
    settle(snap, ref)


def scaling(directory: Path, backend: str, rounds: int) -> None:
    touched = 64 * MIB
    snap = directory / "scale.snap"
    rows = {}
    for size in (128 * MIB, 16 * GIB):
        saves, restores = [], []
        for _ in range(rounds):
            machine = paused_counter(size, backend, touched)
            start = time.perf_counter()
            take_snapshot(machine, snap)
            saves.append(time.perf_counter() - start)
            stop(machine)
            start = time.perf_counter()
            restore_snapshot(snap, console="none").close()
            restores.append(time.perf_counter() - start)
        rows[size] = (statistics.median(saves), statistics.median(restores))
    (s1, r1), (s2, r2) = rows[128 * MIB], rows[16 * GIB]
    print(f"\n{backend}, 64 MiB touched: 16 GiB configured against 128 MiB configured")
    print(
        f"  save     {s1 * 1000:6.1f} ms -> {s2 * 1000:6.1f} ms   ratio {s2 / s1:.2f} (target <= 2)"
    )
    print(
        f"  restore  {r1 * 1000:6.1f} ms -> {r2 * 1000:6.1f} ms   ratio {r2 / r1:.2f} (target <= 2)"
    )
    snap.unlink()


class FirstLine:
    """A console that remembers when its first write came."""

    def __init__(self) -> None:
        self.at: float | None = None
        self.seen = threading.Event()

    def write(self, data: bytes) -> int:
        if self.at is None:
            self.at = time.perf_counter()
            self.seen.set()
        return len(data)

    def flush(self) -> None:
        pass


def lazy(directory: Path, sizes: list[int], rounds: int) -> None:
    print("\nlazy restore (memfd): restore call to the guest's first console line")
    snap = directory / "lazy.snap"
    for touched in sizes:
        machine = paused_counter(touched + GIB, "memfd", touched)
        take_snapshot(machine, snap)
        stop(machine)
        firsts, eagers, completes = [], [], []
        for _ in range(rounds):
            drop_caches()
            console = FirstLine()
            start = time.perf_counter()
            m = restore_snapshot(snap, console_stream=console, lazy=True)  # type: ignore[arg-type]
            start_thread(m)
            console.seen.wait(30)
            assert console.at is not None and m.lazy is not None
            firsts.append(console.at - start)
            m.lazy.wait(120)
            completes.append(m.lazy.stats.seconds_to_complete)
            stop(m)
            drop_caches()
            console = FirstLine()
            start = time.perf_counter()
            m = restore_snapshot(snap, console_stream=console)  # type: ignore[arg-type]
            start_thread(m)
            console.seen.wait(30)
            assert console.at is not None
            eagers.append(console.at - start)
            stop(m)
        first, eager = statistics.median(firsts) * 1000, statistics.median(eagers) * 1000
        print(
            f"  {touched // MIB:5d} MiB touched: first line after {first:6.1f} ms lazy"
            f" (target < 50 ms), {eager:7.1f} ms eager; lazy prefetch done after"
            f" {statistics.median(completes):5.2f} s"
        )
    snap.unlink()


def _to_line(cmd: list[str], text: str = "restored") -> float:
    """Start `cmd` with `echo TEXT` waiting on its stdin; seconds until TEXT is echoed
    back by the guest on its stdout (the restore-to-next-console-line time)."""
    start = time.monotonic()
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL)  # fmt: skip
    assert p.stdin is not None and p.stdout is not None
    p.stdin.write(f"echo {text}\n".encode())
    p.stdin.flush()
    seen = b""
    for chunk in iter(lambda: p.stdout.read1(4096), b""):  # type: ignore[union-attr]
        seen = (seen + chunk)[-4096:]
        if f"\n{text}".encode() in seen:
            break
    took = time.monotonic() - start
    p.kill()
    p.wait()
    return took


def linux(directory: Path, rounds: int, mem_mib: int = 128) -> None:
    """The test kernel at its init's prompt: save (kvmkit snapshot vs QEMU `stop` +
    migrate to a file) and restore to the next console line (`kvmkit snapshot restore`
    vs QEMU `-incoming exec:cat FILE`), both whole processes, same guest."""
    from qemu_ref import Qemu, qemu_command

    from kvmkit.guests.linux.build import find_test_kernel
    from kvmkit.testing.linux import boot_test_kernel

    kernel = find_test_kernel()
    if kernel is None:
        print("\nLinux case skipped: the test kernel is not built (kvmkit kernel build)")
        return
    guest, _ = boot_test_kernel(kernel, memory=f"{mem_mib}M")
    cmdline = guest.machine.description.boot.cmdline
    k_save, k_restore, q_save, q_restore = [], [], [], []
    snap = directory / "linux.snap"
    for _ in range(rounds):
        snap.unlink(missing_ok=True)
        k_save.append(take_snapshot(guest.machine, snap, resume=True).seconds)
    guest.close()
    for _ in range(rounds):
        k_restore.append(
            _to_line([sys.executable, "-m", "kvmkit", "snapshot", "restore", str(snap)])
        )
    base = qemu_command(kernel.vmlinux, kernel.initramfs, cmdline, mem_mib)
    qfile = directory / "qemu.state"
    for i in range(rounds):
        q = Qemu(base, directory, f"q{i}")
        q.wait_console("kvmkit-init: ready")
        q.qmp("stop")
        start = time.monotonic()
        q.migrate(f"exec:cat > {qfile}")
        q_save.append(time.monotonic() - start)
        q.close()
    for _ in range(rounds):
        q_restore.append(_to_line([*base, "-serial", "stdio", "-incoming", f"exec:cat {qfile}"]))
    ks, kr = statistics.median(k_save), statistics.median(k_restore)
    qs, qr = statistics.median(q_save), statistics.median(q_restore)
    print(f"\nLinux guest (test kernel, {mem_mib} MiB, at its prompt), median of {rounds}:")
    print(
        f"  save                    kvmkit {ks * 1000:7.1f} ms   QEMU {qs * 1000:7.1f} ms"
        f"   ratio {ks / qs:.2f}  ({snap.stat().st_size / MIB:.1f} vs"
        f" {qfile.stat().st_size / MIB:.1f} MiB)"
    )
    print(
        f"  restore to next line    kvmkit {kr * 1000:7.1f} ms   QEMU {qr * 1000:7.1f} ms"
        f"   ratio {kr / qr:.2f}  (whole processes)"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--touched-mib", type=int, default=1024)
    p.add_argument("--dir", default="/var/tmp", help="file system to measure on")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--lazy-gib", default="1,8", help="touched sizes for the lazy case")
    p.add_argument("--skip-lazy", action="store_true")
    p.add_argument("--skip-linux", action="store_true")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="kvmkit-bench-") as tmp:
        d = Path(tmp)
        for backend in ("guest_memfd", "memfd"):
            throughput(d, args.touched_mib * MIB, backend, args.rounds)
        for backend in ("guest_memfd", "memfd"):
            scaling(d, backend, args.rounds)
        if not args.skip_lazy:
            lazy(d, [int(g) * GIB for g in args.lazy_gib.split(",")], args.rounds)
        if not args.skip_linux:
            linux(d, args.rounds)


if __name__ == "__main__":
    main()
