"""Fuzz the state stream's parsers for longer than the suite does: the targets of
tests/adversarial/targets.py (prelude and header, section heads, items, JSON, memory
index, page records, ITERATION info, whole snapshot files through inspect).

    python3 -m pip install atheris      # optional: coverage-guided (libFuzzer)
    python3 scripts/fuzz_stream.py [--seconds 600] [--targets prelude,json] \\
        [--engine auto|atheris|hypothesis] [--out DIR]

The time is shared among the targets; each runs in its own process. An input that
raises anything but kvmkit's typed errors (StreamFormatError, ConfigError) is
counted as a finding and saved under --out (the first few of each kind). Every 64th
input is run under tracemalloc and the largest peak is reported, as is each
process's maximum RSS. Exit status 1 if anything was found.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import traceback
import tracemalloc
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_EVERY = 64
SAVED_PER_KIND = 3


class Stats:
    """What one target's process saw; written to `path` as it goes (libFuzzer ends
    the process by itself)."""

    def __init__(self, name: str, path: Path, out: Path) -> None:
        self.name, self.path, self.out = name, path, out
        self.inputs = 0
        self.untyped = 0
        self.kinds: dict[str, int] = {}
        self.peak_traced = 0
        self.largest_input = 0
        self._written = 0.0

    def run(self, target: Any, typed: tuple[type[BaseException], ...], data: bytes) -> None:
        self.inputs += 1
        self.largest_input = max(self.largest_input, len(data))
        sample = self.inputs % SAMPLE_EVERY == 0
        if sample:
            tracemalloc.start()
        try:
            target(data)
        except typed:
            pass
        except Exception as e:  # noqa: BLE001 (the findings)
            self._found(e, data)
        finally:
            if sample:
                self.peak_traced = max(self.peak_traced, tracemalloc.get_traced_memory()[1])
                tracemalloc.stop()
        if time.monotonic() - self._written > 1.0:
            self.write()

    def _found(self, e: Exception, data: bytes) -> None:
        self.untyped += 1
        frame = traceback.extract_tb(e.__traceback__)[-1]
        kind = f"{type(e).__name__} at {Path(frame.filename).name}:{frame.lineno}"
        self.kinds[kind] = self.kinds.get(kind, 0) + 1
        if self.kinds[kind] <= SAVED_PER_KIND:
            self.out.mkdir(parents=True, exist_ok=True)
            name = f"{self.name}-{type(e).__name__}-{frame.lineno}-{self.kinds[kind]}.bin"
            (self.out / name).write_bytes(data)

    def write(self) -> None:
        self._written = time.monotonic()
        record = {
            "target": self.name,
            "inputs": self.inputs,
            "untyped": self.untyped,
            "kinds": self.kinds,
            "peak_traced_bytes": self.peak_traced,
            "largest_input": self.largest_input,
            "max_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        }
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        tmp.replace(self.path)


def child_atheris(name: str, seconds: float, stats_path: Path, out: Path) -> None:
    import atheris

    with atheris.instrument_imports(include=["kvmkit"]):
        import kvmkit.migration.pages  # noqa: F401
        import kvmkit.snapshot.file  # noqa: F401
        from tests.adversarial.targets import TARGETS, TYPED

    stats = Stats(name, stats_path, out)
    target = TARGETS[name]
    atheris.Setup(
        [sys.argv[0], f"-max_total_time={int(seconds)}", "-max_len=4096", "-rss_limit_mb=2048"],
        lambda data: stats.run(target, TYPED, data),
    )
    stats.write()
    atheris.Fuzz()


def child_hypothesis(name: str, seconds: float, stats_path: Path, out: Path) -> None:
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st

    from tests.adversarial.targets import TARGETS, TYPED

    stats = Stats(name, stats_path, out)
    target = TARGETS[name]

    @settings(
        max_examples=2000,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(st.binary(max_size=4096))
    def batch(data: bytes) -> None:
        stats.run(target, TYPED, data)

    stop = time.monotonic() + seconds
    while time.monotonic() < stop:
        batch()
    stats.write()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=600.0, help="in all, shared by the targets")
    p.add_argument("--targets", default="", help="comma-separated names (default: all)")
    p.add_argument("--engine", choices=["auto", "atheris", "hypothesis"], default="auto")
    p.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "kvmkit-fuzz-findings"))
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--stats", help=argparse.SUPPRESS)
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    out = Path(args.out)
    if args.child:
        run = child_atheris if args.engine == "atheris" else child_hypothesis
        run(args.child, args.seconds, Path(args.stats), out)
        return 0

    from tests.adversarial.targets import TARGETS

    engine = args.engine
    if engine == "auto":
        try:
            import atheris  # noqa: F401

            engine = "atheris"
        except ImportError:
            engine = "hypothesis"
    names = [n for n in args.targets.split(",") if n] or sorted(TARGETS)
    each = args.seconds / len(names)
    print(f"fuzzing {len(names)} targets with {engine}, {each:.0f} s each", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="kvmkit-fuzz-") as tmp:
        for name in names:
            stats_path = Path(tmp) / f"{name}.json"
            cmd = [sys.executable, __file__, "--child", name, "--engine", engine]
            cmd += ["--seconds", str(each), "--stats", str(stats_path), "--out", str(out)]
            env = {**os.environ, "PYTHONPATH": str(ROOT)}
            started = time.monotonic()
            proc = subprocess.run(
                cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=each + 120
            )
            took = time.monotonic() - started
            record = json.loads(stats_path.read_text()) if stats_path.exists() else {}
            record.update(target=name, exit=proc.returncode, seconds=took)
            if proc.returncode != 0:
                record["stderr_tail"] = proc.stderr[-600:]
            rows.append(record)
            print(
                f"  {name:<14} {record.get('inputs', 0):>9} inputs  {took:5.0f} s"
                f"  untyped {record.get('untyped', '?'):>4}"
                f"  peak traced {record.get('peak_traced_bytes', 0) / 2**20:6.2f} MiB"
                f"  max RSS {record.get('max_rss_kib', 0) / 1024:6.1f} MiB"
                f"  exit {proc.returncode}",
                flush=True,
            )
            for kind, n in record.get("kinds", {}).items():
                print(f"      {n:>6} x {kind}")
            if proc.returncode != 0:
                print("      " + record["stderr_tail"].replace("\n", "\n      "))
    total = sum(r.get("inputs", 0) for r in rows)
    untyped = sum(r.get("untyped", 0) for r in rows)
    crashed = sum(1 for r in rows if r["exit"] != 0)
    print(f"total: {total} inputs, {untyped} untyped exceptions, {crashed} processes failed")
    if untyped:
        print(f"inputs saved under {out}")
    return 1 if untyped or crashed else 0


if __name__ == "__main__":
    sys.exit(main())
