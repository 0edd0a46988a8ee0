"""Linux boot: kvmkit against QEMU booting the same kernel, initrd and command line on
the same host in the same run, and the restore-to-next-console-line time of a booted
snapshot.

Both VMMs boot the project's test kernel (`kvmkit kernel build`) as an uncompressed
vmlinux through PVH, 1 vCPU, 128 MiB, with the same command line (the test kernel's
recommended one plus tsc_early_khz from KVM and the CPUID workarounds kvmkit adds on a
PVM host), and are timed from process start to the init's banner
(`kvmkit-init: ready`), wall and CPU seconds (the process and its children, from
rusage). QEMU: `qemu-system-x86_64 -enable-kvm -M microvm` (Debian: apt-get install
qemu-system-x86). Median of --runs (3), alternating; the ratio kvmkit / QEMU is the
result (goal: at most 0.8).

    python3 benchmarks/linux_boot.py [--runs 3] [--memory 128M]
"""

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing

from kvmkit.guests.linux.build import find_test_kernel  # noqa: E402
from kvmkit.kvm import Kvm  # noqa: E402
from kvmkit.testing.linux import boot_test_kernel, restore_guest, snapshot_at_prompt  # noqa: E402

BANNER = b"kvmkit-init: ready"


def timed_until_banner(cmd: list[str], timeout_s: float = 300) -> tuple[float, float]:
    """Start `cmd`, wait for the banner on its stdout, kill it: (wall s, CPU s)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    p = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL
    )
    assert p.stdout is not None
    seen = threading.Event()
    wall = [0.0]

    def watch() -> None:
        buf = b""
        for chunk in iter(lambda: p.stdout.read1(4096), b""):  # type: ignore[union-attr]
            buf = (buf + chunk)[-4096:]
            if BANNER in buf:
                wall[0] = time.monotonic() - start
                seen.set()
                return

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    ok = seen.wait(timeout_s)
    p.kill()
    p.wait()
    if not ok:
        sys.exit(f"no banner from {cmd[0]} within {timeout_s} s")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall[0], cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--memory", default="128M")
    args = parser.parse_args()
    kernel = find_test_kernel()
    if kernel is None:
        sys.exit("the test kernel is not built: run 'kvmkit kernel build' first")
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        sys.exit("QEMU is not installed: apt-get install qemu-system-x86")
    with Kvm() as kvm, kvm.create_vm() as vm:
        tsc_khz = vm.create_vcpu(0).get_tsc_khz()
    # The command line kvmkit boots with (it adds tsc_early_khz and, on a PVM host, the
    # CPUID workarounds): read it back from a kvmkit boot so QEMU gets the very same.
    guest, _ = boot_test_kernel(kernel, memory=args.memory)
    cmdline = guest.machine.description.boot.cmdline
    guest.close()
    mem_mib = int(args.memory.rstrip("M"))
    kvmkit_cmd = [
        sys.executable,
        "-m",
        "kvmkit",
        "run",
        "--kernel",
        str(kernel.vmlinux),
        "--initrd",
        str(kernel.initramfs),
        "--cmdline",
        cmdline,
        "--memory",
        args.memory,
        "-q",
    ]
    qemu_cmd = [
        qemu,
        "-enable-kvm",
        "-M",
        "microvm,rtc=on,acpi=off",
        "-cpu",
        "host",
        "-m",
        str(mem_mib),
        "-smp",
        "1",
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-serial",
        "stdio",
        "-kernel",
        str(kernel.vmlinux),
        "-initrd",
        str(kernel.initramfs),
        "-append",
        cmdline,
    ]
    print(f"kernel {kernel.vmlinux} ({kernel.version}), {args.memory}, 1 vCPU, tsc {tsc_khz} kHz")
    print(f"cmdline: {cmdline}")
    k_wall, k_cpu, q_wall, q_cpu = [], [], [], []
    for i in range(args.runs):
        w, c = timed_until_banner(kvmkit_cmd)
        k_wall.append(w)
        k_cpu.append(c)
        w, c = timed_until_banner(qemu_cmd)
        q_wall.append(w)
        q_cpu.append(c)
        print(
            f"run {i + 1}: kvmkit {k_wall[-1]:.2f} s wall {k_cpu[-1]:.2f} s CPU;"
            f"  QEMU {q_wall[-1]:.2f} s wall {q_cpu[-1]:.2f} s CPU"
        )
    kw, kc = statistics.median(k_wall), statistics.median(k_cpu)
    qw, qc = statistics.median(q_wall), statistics.median(q_cpu)
    print(f"boot to the init's banner, median of {args.runs}:")
    print(f"  kvmkit  {kw:6.2f} s wall  {kc:6.2f} s CPU")
    print(f"  QEMU    {qw:6.2f} s wall  {qc:6.2f} s CPU")
    print(f"  ratio kvmkit / QEMU: wall {kw / qw:.2f}, CPU {kc / qc:.2f}  (goal <= 0.8)")

    with tempfile.TemporaryDirectory(prefix="kvmkit-bench-") as tmp:
        guest, _ = boot_test_kernel(kernel, memory=args.memory)
        snap = snapshot_at_prompt(guest, Path(tmp) / "booted.snap")
        times = []
        for _ in range(5):
            start = time.monotonic()
            g = restore_guest(snap)
            g.send("echo restored")
            g.wait_for("restored")
            times.append(time.monotonic() - start)
            g.close()
        size = os.path.getsize(snap)
        print(
            f"restore of the booted snapshot ({size >> 20} MiB) to the next console line:"
            f" {statistics.median(times) * 1000:.1f} ms (median of 5; a boot: {kw:.1f} s)"
        )


if __name__ == "__main__":
    main()
