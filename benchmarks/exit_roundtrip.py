"""Per-exit cost of kvmkit's vCPU loop against a minimal C KVM_RUN loop.

Both drive the same guest (the built-in `exitloop`: N port writes to 0x80, then
the debug-exit port) on identically built machines, in one process, alternating
rounds. Prints the time per exit of each and the ratio kvmkit / C: the median of the
rounds' own ratios (each kvmkit round against the C round just before it, so a host
that drifts faster or slower during the run moves both), and the ratio of the
fastest rounds of each (the least disturbed by the rest of the host). The user-mode
CPU time per exit (getrusage around each round, the machine's build included) shows
what kvmkit's Python adds without the kernel side's swings between runs.

On a PVM host the guest's `out` instructions are emulated by KVM, so the kernel
side of each exit is large; the ratio shows what kvmkit's Python loop adds.

    python3 benchmarks/exit_roundtrip.py [--exits N] [--rounds R]
"""

import argparse
import ctypes
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing

from kvmkit.machine import MachineConfig, build_for_boot  # noqa: E402


def build_reference(out_dir: Path) -> ctypes.CDLL:
    so = out_dir / "exit_roundtrip.so"
    subprocess.run(
        ["gcc", "-O2", "-shared", "-fPIC", "-o", str(so), str(HERE / "exit_roundtrip.c")],
        check=True,
    )
    lib = ctypes.CDLL(str(so))
    lib.run_loop.restype = ctypes.c_long
    lib.run_loop.argtypes = [ctypes.c_int, ctypes.c_void_p]
    return lib


def config(exits: int) -> MachineConfig:
    return MachineConfig(guest="exitloop", guest_arg=exits, memory_bytes=16 << 20, console="none")


def user_s() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_utime


def kvmkit_round(exits: int) -> float:
    with build_for_boot(config(exits)) as m:
        result = m.run()
        if result.status != 0 or result.exits.get("IO") != exits + 1:
            sys.exit(f"kvmkit run went wrong: {result.reason} {result.exits}")
        return result.wall_s / (exits + 1)


def c_round(lib: ctypes.CDLL, exits: int) -> float:
    with build_for_boot(config(exits)) as m:
        vcpu = m.vcpus[0]
        start = time.perf_counter()
        n = lib.run_loop(vcpu.fd, vcpu.run_addr)
        elapsed = time.perf_counter() - start
        if n != exits + 1:
            sys.exit(f"C loop went wrong: returned {n}")
        return elapsed / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--exits", type=int, default=100_000, help="port writes per round")
    ap.add_argument("--rounds", type=int, default=5, help="rounds of each, alternating")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        lib = build_reference(Path(tmp))
        kvmkit_round(1000)  # build the guest and warm up both paths
        c_round(lib, 1000)
        py, c, py_user, c_user = [], [], [], []
        for r in range(args.rounds):
            before = user_s()
            c.append(c_round(lib, args.exits))
            c_user.append((user_s() - before) / (args.exits + 1))
            before = user_s()
            py.append(kvmkit_round(args.exits))
            py_user.append((user_s() - before) / (args.exits + 1))
            print(
                f"round {r + 1}: C {c[-1] * 1e6:6.2f} us/exit   kvmkit {py[-1] * 1e6:6.2f} us/exit",
                file=sys.stderr,
            )
    py_us, c_us = statistics.median(py) * 1e6, statistics.median(c) * 1e6
    paired = statistics.median(p / q for p, q in zip(py, c, strict=True))
    print(f"exits per round        {args.exits + 1}")
    print(f"C KVM_RUN loop         {c_us:.2f} us/exit (median of {args.rounds})")
    print(f"kvmkit vCPU loop       {py_us:.2f} us/exit (median of {args.rounds})")
    print(f"kvmkit overhead        {py_us - c_us:.2f} us/exit")
    print(f"ratio kvmkit / C       {paired:.3f}  (median of the rounds' ratios; target <= 1.2)")
    print(f"ratio of fastest       {min(py) / min(c):.3f}")
    c_cpu, py_cpu = statistics.median(c_user) * 1e6, statistics.median(py_user) * 1e6
    print(f"user CPU per exit      C {c_cpu:.2f} us, kvmkit {py_cpu:.2f} us (median)")


if __name__ == "__main__":
    main()
