"""Per-exit cost of kvmkit's vCPU loop against a minimal C KVM_RUN loop.

Both drive the same guest (the built-in `exitloop`: N port writes to 0x80, then
the debug-exit port) on identically built machines, in one process, alternating
rounds. Prints the time per exit of each and the ratio kvmkit / C.

On a PVM host the guest's `out` instructions are emulated by KVM, so the kernel
side of each exit is large; the ratio shows what kvmkit's Python loop adds.

    python3 benchmarks/exit_roundtrip.py [--exits N] [--rounds R]
"""

import argparse
import ctypes
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
        py, c = [], []
        for r in range(args.rounds):
            c.append(c_round(lib, args.exits))
            py.append(kvmkit_round(args.exits))
            print(
                f"round {r + 1}: C {c[-1] * 1e6:6.2f} us/exit   kvmkit {py[-1] * 1e6:6.2f} us/exit",
                file=sys.stderr,
            )
    py_us, c_us = statistics.median(py) * 1e6, statistics.median(c) * 1e6
    print(f"exits per round        {args.exits + 1}")
    print(f"C KVM_RUN loop         {c_us:.2f} us/exit (median of {args.rounds})")
    print(f"kvmkit vCPU loop       {py_us:.2f} us/exit (median of {args.rounds})")
    print(f"kvmkit overhead        {py_us - c_us:.2f} us/exit")
    print(f"ratio kvmkit / C       {py_us / c_us:.3f}  (target <= 1.3)")


if __name__ == "__main__":
    main()
