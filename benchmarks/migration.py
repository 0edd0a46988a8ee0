"""Live migration on this host, as ratios to moving the same bytes over the same kind
of socket in the same run.

1. Idle guest, 1 GiB touched (filled by the host with a non-zero pattern; the guest
   halts in the in-kernel irqchip, so it writes nothing): downtime (from the source's
   pause to the target's "running"; target: under 10 ms on loopback) and total time,
   against two references on the same socket type:
   - raw: the same number of bytes sent with sendall from a buffer and read by a
     second process into a reused buffer (the transport alone);
   - into memory: the same, the reader writing into fresh guest-sized memory of the
     same backend (the transport plus the page allocation a target cannot avoid).
   Target: total / raw <= 1.25.
3. A Linux guest (the test kernel at its init's prompt, `kvmkit kernel build`) migrated
   over a unix socket by kvmkit and by QEMU (`-M microvm`, QMP migrate to a second QEMU
   started with -incoming), same kernel and command line: downtime and total time, as
   ratios kvmkit / QEMU.
2. The dirtier guest writing 10%, 50% and 90% of the link's bandwidth (the link is
   limited with --bandwidth so the guest, emulated on a PVM host, can keep up): the
   downtime, iterations, total time and the throttle auto-converge needed.

    python3 benchmarks/migration.py [--touched-mib 1024] [--rounds 3] [--skip-dirtier]

The source runs in this process, the target is a `kvmkit migrate receive` process;
both share this machine's cores with the reference's reader.
"""

import argparse
import os
import socket
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

from kvmkit.api.client import call  # noqa: E402
from kvmkit.machine import Machine, MachineConfig, build_for_boot  # noqa: E402
from kvmkit.migration import migrate  # noqa: E402
from kvmkit.testing.harness import build_asm  # noqa: E402

MIB = 1 << 20
GIB = 1 << 30
FILL_OFFSET = 16 * MIB
IDLE_GUEST = "1:  hlt\n    jmp 1b\n"  # interrupts off: halts for good, in the kernel
PIECE = 4 * MIB

READER = r"""
import mmap, os, socket, sys, time
kind, where, nbytes, into = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
if kind == "unix":
    srv = socket.socket(socket.AF_UNIX); srv.bind(where)
else:
    srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", int(where)))
srv.listen(1)
print("ready", flush=True)
conn, _ = srv.accept()
if into == "memory":
    fd = os.memfd_create("reference")
    os.ftruncate(fd, nbytes)
    buf = mmap.mmap(fd, nbytes)
    view = memoryview(buf)
else:
    view = memoryview(bytearray(4 << 20))
got = 0
while got < nbytes:
    at = got if into == "memory" else 0
    n = conn.recv_into(view[at : at + (4 << 20)] if into == "memory" else view)
    if not n:
        break
    got += n
conn.sendall(b"done")
print(got, flush=True)
"""


def tune(sock: socket.socket) -> None:
    """As kvmkit's migration sockets are (kvmkit/migration/address.py)."""
    from kvmkit.migration.address import SOCKET_BUFFER_BYTES

    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER_BYTES)
    if sock.family == socket.AF_INET:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def reference(kind: str, tmp: Path, nbytes: int, into: str) -> float:
    """Seconds to send `nbytes` to a reader process over `kind` (unix or tcp)."""
    where = str(tmp / "ref.sock") if kind == "unix" else str(free_port())
    reader = subprocess.Popen(
        [sys.executable, "-c", READER, kind, where, str(nbytes), into],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert reader.stdout is not None and reader.stdout.readline().strip() == "ready"
    sock = socket.socket(socket.AF_UNIX if kind == "unix" else socket.AF_INET)
    tune(sock)
    sock.connect(where if kind == "unix" else ("127.0.0.1", int(where)))
    data = memoryview(bytes(range(256)) * (PIECE // 256))
    start = time.perf_counter()
    left = nbytes
    while left:
        n = min(left, PIECE)
        sock.sendall(data[:n])
        left -= n
    assert sock.recv(4) == b"done"
    seconds = time.perf_counter() - start
    sock.close()
    reader.wait(30)
    if kind == "unix":
        os.unlink(where)
    return seconds


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fill(machine: Machine, nbytes: int, at: int = FILL_OFFSET) -> None:
    """Touch `nbytes` of guest RAM from `at` with a non-zero pattern, from the host."""
    block = bytes(range(256)) * (MIB // 256)
    assert machine.memory is not None
    for offset in range(at, at + nbytes, MIB):
        machine.memory.file_view(offset, MIB)[:] = block


def start(machine: Machine) -> threading.Thread:
    t = threading.Thread(target=machine.run, daemon=True)
    t.start()
    while not machine.running:
        time.sleep(0.001)
    return t


class Target:
    def __init__(self, tmp: Path, kind: str) -> None:
        self.api = str(tmp / "target.api")
        self.address = (
            f"unix:{tmp / 'target.sock'}" if kind == "unix" else (f"tcp:127.0.0.1:{free_port()}")
        )
        self.err = tmp / "target.err"
        with open(self.err, "w") as err:
            self.p = subprocess.Popen(
                [sys.executable, "-m", "kvmkit", "migrate", "receive", "--listen", self.address]
                + ["--console", "none", "--api-socket", self.api, "-q"],
                stderr=err,
            )
        while "waiting for a migration" not in self.err.read_text():
            assert self.p.poll() is None, self.err.read_text()
            time.sleep(0.01)

    def stop(self) -> None:
        deadline = time.monotonic() + 30
        while not os.path.exists(self.api):
            assert time.monotonic() < deadline and self.p.poll() is None, self.err.read_text()
            time.sleep(0.01)
        call(self.api, "stop")
        assert self.p.wait(30) == 0, self.err.read_text()


def idle(tmp: Path, backend: str, kind: str, touched: int, rounds: int) -> None:
    guest = str(build_asm(IDLE_GUEST, tmp / "guest"))
    totals, downtimes, raws, intos = [], [], [], []
    report = None
    for _ in range(rounds):
        config = MachineConfig(
            guest=guest,
            memory_bytes=touched + GIB,
            memory_backend=backend,
            irqchip=True,
            console="none",
        )
        machine = build_for_boot(config)
        fill(machine, touched)
        thread = start(machine)
        target = Target(tmp, kind)
        report = migrate(machine, target.address)
        thread.join(10)
        machine.close()
        target.stop()
        totals.append(report.total_s)
        downtimes.append(report.downtime_ms)
        raws.append(reference(kind, tmp, report.bytes_sent, "buffer"))
        intos.append(reference(kind, tmp, report.bytes_sent, "memory"))
    assert report is not None
    total, down = statistics.median(totals), statistics.median(downtimes)
    raw, into = statistics.median(raws), statistics.median(intos)
    print(
        f"\n{backend} over {kind}, {touched // MIB} MiB touched, idle guest, median of {rounds}"
        f" ({report.bytes_sent / MIB:.0f} MiB sent, {report.iterations} pre-copy pass)"
    )
    print(
        f"  downtime {down:6.1f} ms (target < 10 ms; runs: "
        + ", ".join(f"{d:.1f}" for d in downtimes)
        + ")"
    )
    print(
        f"  total    {total * 1000:6.0f} ms  {report.bytes_sent / total / GIB:5.2f} GiB/s"
        f"   raw {raw * 1000:5.0f} ms: ratio {total / raw:.2f} (target <= 1.25)"
        f"   into memory {into * 1000:5.0f} ms: ratio {total / into:.2f}"
    )


def dirtier(tmp: Path, link: int, shares: list[int]) -> None:
    print(
        f"\ndirtier guest (256 MiB working set) over unix, link limited to"
        f" {link // MIB} MiB/s, downtime target 20 ms"
    )
    for share in shares:
        for auto in (False, True):
            pages_per_ms = max(1, link * share // 100 // 4096 // 1000)
            config = MachineConfig(
                guest="dirtier",
                guest_arg=(256 << 32) | pages_per_ms,
                memory_bytes=512 * MIB,
                console="none",
            )
            machine = build_for_boot(config)
            fill(machine, 256 * MIB, at=2 * MIB)  # the working set, touched up front
            thread = start(machine)
            time.sleep(0.5)
            target = Target(tmp, "unix")
            r = migrate(machine, target.address, bandwidth_bps=link, auto_converge=auto)
            thread.join(10)
            machine.close()
            target.stop()
            print(
                f"  {share:3d}% ({pages_per_ms:3d} pages/ms){' auto-converge' if auto else '':14}"
                f" downtime {r.downtime_ms:6.1f} ms, {r.iterations:2d} iterations,"
                f" total {r.total_s:5.2f} s, {r.bytes_sent / MIB:6.0f} MiB sent,"
                f" throttle {r.throttle_max * 100:3.0f}%,"
                f" {'converged' if r.converged else 'did not converge'}"
            )


def linux(tmp: Path, rounds: int, mem_mib: int = 128) -> None:
    """The test kernel idle at its init's prompt, migrated over a unix socket: kvmkit
    (source restored from a booted snapshot, target a `kvmkit migrate receive`) against
    QEMU (a booted microvm migrated with QMP `migrate` to a second QEMU started with
    -incoming), same kernel, initrd, command line and memory."""
    from qemu_ref import Qemu, qemu_command

    from kvmkit.guests.linux.build import find_test_kernel
    from kvmkit.testing.linux import boot_test_kernel, restore_guest, snapshot_at_prompt

    kernel = find_test_kernel()
    if kernel is None:
        print("\nLinux case skipped: the test kernel is not built (kvmkit kernel build)")
        return
    guest, _ = boot_test_kernel(kernel, memory=f"{mem_mib}M")
    cmdline = guest.machine.description.boot.cmdline
    snap = snapshot_at_prompt(guest, tmp / "linux.snap")
    k_down, k_total, q_down, q_total = [], [], [], []
    for _ in range(rounds):
        source = restore_guest(snap)
        source.command("echo ready")
        target = Target(tmp, "unix")
        r = migrate(source.machine, target.address)
        source.finish()
        source.close()
        target.stop()
        k_down.append(r.downtime_ms)
        k_total.append(r.total_s * 1000)
    base = qemu_command(kernel.vmlinux, kernel.initramfs, cmdline, mem_mib)
    src = Qemu(base, tmp, "qsrc")
    src.wait_console("kvmkit-init: ready")
    for i in range(rounds):
        sock = tmp / f"q{i}.sock"
        dst = Qemu(base, tmp, f"qdst{i}", incoming=f"unix:{sock}")
        info = src.migrate(f"unix:{sock}")
        src.close()
        q_down.append(float(info.get("downtime", 0)))
        q_total.append(float(info.get("total-time", 0)))
        src = dst  # the target runs on: migrate it next round
    src.close()
    kd, kt = statistics.median(k_down), statistics.median(k_total)
    qd, qt = statistics.median(q_down), statistics.median(q_total)
    print(
        f"\nLinux guest (test kernel, {mem_mib} MiB, idle at its prompt) over unix,"
        f" median of {rounds}"
    )
    print(
        f"  kvmkit  downtime {kd:6.1f} ms   total {kt:7.1f} ms  ({r.bytes_sent / MIB:.0f} MiB sent)"
    )
    print(f"  QEMU    downtime {qd:6.1f} ms   total {qt:7.1f} ms  (its own query-migrate figures)")
    print(f"  ratio kvmkit / QEMU: downtime {kd / qd:.2f}, total {kt / qt:.2f}")
    print("  (kvmkit's downtime runs to the target's 'running'; QEMU's to its completion)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--touched-mib", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--link-mib", type=int, default=256, help="link limit for the dirtier")
    p.add_argument("--skip-idle", action="store_true")
    p.add_argument("--skip-dirtier", action="store_true")
    p.add_argument("--skip-linux", action="store_true")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="kvmkit-migrate-bench-") as tmp:
        if not args.skip_idle:
            for backend in ("guest_memfd", "memfd"):
                for kind in ("unix", "tcp"):
                    idle(Path(tmp), backend, kind, args.touched_mib * MIB, args.rounds)
        if not args.skip_dirtier:
            dirtier(Path(tmp), args.link_mib * MIB, [10, 50, 90])
        if not args.skip_linux:
            linux(Path(tmp), args.rounds)


if __name__ == "__main__":
    main()
