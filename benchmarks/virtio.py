"""virtio devices: kvmkit against QEMU on the same host, in the same run, with the same
kernel, initrd and command line.

blk: sequential O_DIRECT write, then read, of --mib MiB in 1 MiB requests (the test
init's blk-write / blk-read on /dev/vda) on a fresh sparse file; each VMM is a
process with its serial console on stdin/stdout, timed from sending the command to
its `done` line. Host CPU is the VMM process's (all its threads: vCPU, device,
event loop) utime + stime from /proc/PID/stat over the same span, per MiB moved.
QEMU: `qemu-system-x86_64 -enable-kvm -M microvm` with `-device virtio-blk-device`
(Debian: apt-get install qemu-system-x86), cache=unsafe like kvmkit's default.

    python3 benchmarks/virtio.py [--mib 32] [--runs 1] [--only blk]

`BENCHES` maps a name to its function; the net branch adds "tcp" (a placeholder here).
"""

import argparse
import os
import select
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing
sys.path.insert(0, str(HERE))

from qemu_ref import qemu_command  # noqa: E402

from kvmkit.guests.linux.build import TestKernel, find_test_kernel  # noqa: E402
from kvmkit.testing.linux import boot_test_kernel  # noqa: E402

BANNER = b"kvmkit-init: ready"
DONE = b"kvmkit-init: done rc="
CLK_TCK = os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


class Console:
    """A VMM process whose serial console is its stdin and stdout."""

    def __init__(self, cmd: list[str]) -> None:
        self.p = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
        self.buf = b""

    def wait_for(self, text: bytes, timeout_s: float = 300) -> bytes:
        """Read until `text` has been printed; the output up to its line's end."""
        assert self.p.stdout is not None
        deadline = time.monotonic() + timeout_s
        fd = self.p.stdout.fileno()
        while True:
            at = self.buf.find(text)
            if at >= 0 and b"\n" in self.buf[at:]:
                end = self.buf.index(b"\n", at) + 1
                out, self.buf = self.buf[:end], self.buf[end:]
                return out
            left = deadline - time.monotonic()
            if left <= 0 or self.p.poll() is not None:
                sys.exit(f"{text!r} not seen; last output: {self.buf[-400:]!r}")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    sys.exit(f"the VMM ended before {text!r}: {self.buf[-400:]!r}")
                self.buf += chunk

    def command(self, line: str) -> tuple[float, float, bytes]:
        """Run one init command: (wall s, VMM CPU s, its output)."""
        assert self.p.stdin is not None
        cpu0, t0 = process_cpu_s(self.p.pid), time.monotonic()
        self.p.stdin.write(line.encode() + b"\n")
        self.p.stdin.flush()
        out = self.wait_for(DONE)
        wall, cpu = time.monotonic() - t0, process_cpu_s(self.p.pid) - cpu0
        if DONE + b"0" not in out:
            sys.exit(f"{line!r} failed: {out[-400:]!r}")
        return wall, cpu, out

    def close(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait()


@dataclass
class Result:
    vmm: str
    op: str
    mib: int
    wall_s: float
    cpu_s: float

    @property
    def mib_s(self) -> float:
        return self.mib / self.wall_s

    @property
    def cpu_ms_per_mib(self) -> float:
        return self.cpu_s * 1000 / self.mib


def blk_run(vmm: str, cmd: list[str], mib: int) -> list[Result]:
    console = Console(cmd)
    try:
        console.wait_for(BANNER)
        out = []
        for op, line in (
            ("write", f"blk-write /dev/vda 0 {mib << 20} 7"),
            ("read", f"blk-read /dev/vda 0 {mib << 20}"),
        ):
            wall, cpu, _ = console.command(line)
            out.append(Result(vmm, op, mib, wall, cpu))
        return out
    finally:
        console.close()


def bench_blk(kernel: TestKernel, cmdline: str, args: argparse.Namespace) -> None:
    mem_mib = 128
    print(f"blk: sequential O_DIRECT, 1 MiB requests, {args.mib} MiB, {mem_mib} MiB guest")
    results: dict[tuple[str, str], list[Result]] = {}
    with tempfile.TemporaryDirectory(prefix="kvmkit-bench-") as tmp:
        disk = Path(tmp) / "disk.img"
        for i in range(args.runs):
            for vmm in ("kvmkit", "qemu"):
                disk.unlink(missing_ok=True)
                with open(disk, "wb") as f:
                    f.truncate((args.mib + 1) << 20)
                if vmm == "kvmkit":
                    cmd = [
                        sys.executable, "-m", "kvmkit", "run", "--kernel", str(kernel.vmlinux),
                        "--initrd", str(kernel.initramfs), "--cmdline", cmdline,
                        "--memory", f"{mem_mib}M", "--drive", f"path={disk}", "-q",
                    ]  # fmt: skip
                else:
                    # QEMU places its own virtio_mmio.device= entries: strip kvmkit's
                    plain = " ".join(w for w in cmdline.split() if "virtio_mmio" not in w)
                    cmd = [
                        *qemu_command(kernel.vmlinux, kernel.initramfs, plain, mem_mib),
                        "-serial", "stdio",
                        "-drive", f"id=d0,file={disk},format=raw,if=none,cache=unsafe",
                        "-device", "virtio-blk-device,drive=d0",
                    ]  # fmt: skip
                for r in blk_run(vmm, cmd, args.mib):
                    results.setdefault((vmm, r.op), []).append(r)
                    print(
                        f"  run {i + 1} {vmm:6} {r.op:5}: {r.mib_s:6.2f} MiB/s,"
                        f" {r.cpu_ms_per_mib:7.1f} ms host CPU per MiB"
                    )
    print(f"median of {args.runs}:")
    for op in ("write", "read"):
        k, q = results[("kvmkit", op)], results[("qemu", op)]
        k_rate = statistics.median(r.mib_s for r in k)
        q_rate = statistics.median(r.mib_s for r in q)
        k_cpu = statistics.median(r.cpu_ms_per_mib for r in k)
        q_cpu = statistics.median(r.cpu_ms_per_mib for r in q)
        print(
            f"  {op:5}  kvmkit {k_rate:6.2f} MiB/s {k_cpu:7.1f} ms CPU/MiB;"
            f"  QEMU {q_rate:6.2f} MiB/s {q_cpu:7.1f} ms CPU/MiB;"
            f"  ratio kvmkit/QEMU: throughput {k_rate / q_rate:.2f}, CPU per MiB"
            f" {k_cpu / q_cpu:.2f}"
        )


def bench_tcp(kernel: TestKernel, cmdline: str, args: argparse.Namespace) -> None:
    """Placeholder: virtio-net TCP throughput (the net branch fills this in)."""
    print("tcp: not measured here (virtio-net is on the net branch)")


BENCHES: dict[str, Callable[[TestKernel, str, argparse.Namespace], None]] = {
    "blk": bench_blk,
    "tcp": bench_tcp,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=32, help="MiB per transfer (default 32)")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--only", choices=sorted(BENCHES), action="append")
    args = parser.parse_args()
    kernel = find_test_kernel()
    if kernel is None:
        sys.exit("the test kernel is not built: run 'kvmkit kernel build' first")
    # The command line kvmkit boots with (tsc_early_khz, the CPUID workarounds): read it
    # back from a kvmkit boot so QEMU gets the very same.
    guest, _ = boot_test_kernel(kernel)
    cmdline = guest.machine.description.boot.cmdline
    guest.close()
    print(f"kernel {kernel.vmlinux} ({kernel.version}); cmdline: {cmdline}")
    for name in args.only or list(BENCHES):
        BENCHES[name](kernel, cmdline, args)


if __name__ == "__main__":
    main()
