"""What the VMM itself costs in memory: the RSS of a running `kvmkit run` (a guest
that counts, 64 MiB of guest RAM on guest_memfd) against a bare Python interpreter
measured in the same run, as a ratio, and against the goal of 20 MiB.

Guest RAM is not the VMM's own: it is in the guest_memfd file (RssShmem when the VMM
touches it, which this guest's run does not), so the lines below are the
interpreter, kvmkit's modules and its threads. Each figure is the median of a few
processes, read from /proc/PID/status once the run is under way.

    python3 benchmarks/vmm_memory.py [--rounds N] [--memory 64M] [--vcpus 1]
"""

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
GOAL_KIB = 20 * 1024
FIELDS = ("VmRSS", "RssAnon", "RssFile", "RssShmem")


def status(pid: int) -> dict[str, int]:
    found: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in FIELDS:
            found[name] = int(value.split()[0])
    return found


def measure(argv: list[str], settle_s: float) -> dict[str, int]:
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    try:
        time.sleep(settle_s)
        if p.poll() is not None:
            raise SystemExit(f"{argv[:4]} ended early with status {p.returncode}")
        return status(p.pid)
    finally:
        p.kill()
        p.wait()


def median(samples: list[dict[str, int]]) -> dict[str, int]:
    return {f: int(statistics.median(s.get(f, 0) for s in samples)) for f in FIELDS}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--memory", default="64M")
    ap.add_argument("--vcpus", default="1")
    args = ap.parse_args()
    bare = [sys.executable, "-c", "import time; time.sleep(60)"]
    vmm = [
        sys.executable,
        "-m",
        "kvmkit",
        "run",
        "--guest",
        "counter",
        "--memory",
        args.memory,
        "--vcpus",
        args.vcpus,
        "--console",
        "none",
        "-q",
    ]
    ref = median([measure(bare, 1.0) for _ in range(args.rounds)])
    got = median([measure(vmm, 3.0) for _ in range(args.rounds)])
    print(f"{'':24}{'VmRSS':>10}{'RssAnon':>10}{'RssFile':>10}{'RssShmem':>10}  (KiB)")
    for name, row in (("bare python3", ref), (f"kvmkit run ({args.memory})", got)):
        print(f"{name:24}" + "".join(f"{row[f]:>10}" for f in FIELDS))
    added = got["VmRSS"] - ref["VmRSS"]
    print(
        f"kvmkit / bare interpreter: {got['VmRSS'] / ref['VmRSS']:.2f}x"
        f" (kvmkit adds {added / 1024:.1f} MiB); VMM total {got['VmRSS'] / 1024:.1f} MiB,"
        f" goal < {GOAL_KIB // 1024} MiB: {'met' if got['VmRSS'] < GOAL_KIB else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
