"""Branch coverage of kvm/, memory/, machine/ and devices/, with and without
tests/faults, subprocesses (the CLI tests, migration targets) included.

    python3 -m pip install '.[test]' && python3 scripts/coverage_report.py

Each measurement runs the whole suite under coverage (about 3-4 minutes here) and
prints, per package, the branches taken of all branches (coverage.py's branch
arcs, the strict measure: statements are not counted in).
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("kvm", "memory", "machine", "devices")


def measure(label: str, extra: list[str]) -> dict[str, tuple[int, int]]:
    with tempfile.TemporaryDirectory(prefix="kvmkit-cov-") as tmp:
        env = {**os.environ, "COVERAGE_FILE": str(Path(tmp) / ".coverage")}
        coverage = [sys.executable, "-m", "coverage"]
        pytest = ["run", "-m", "pytest", "-q", "-p", "no:cacheprovider"]
        subprocess.run(coverage + pytest + extra, cwd=ROOT, env=env, check=False)
        subprocess.run(coverage + ["combine", "-q"], cwd=ROOT, env=env, check=True)
        out = Path(tmp) / "cov.json"
        subprocess.run(coverage + ["json", "-q", "-o", str(out)], cwd=ROOT, env=env, check=True)
        files = json.loads(out.read_text())["files"]
    result = {}
    for pkg in PACKAGES:
        rows = [v["summary"] for f, v in files.items() if f"kvmkit/{pkg}/" in f]
        result[pkg] = (
            sum(r["covered_branches"] for r in rows),
            sum(r["num_branches"] for r in rows),
        )
    print(f"\n{label}")
    for pkg, (hit, total) in result.items():
        print(f"  {pkg + '/':<10} {hit:>4}/{total:<4} branches  {100 * hit / total:5.1f}%")
    hit = sum(h for h, _ in result.values())
    total = sum(t for _, t in result.values())
    print(f"  {'together':<10} {hit:>4}/{total:<4} branches  {100 * hit / total:5.1f}%")
    return result


if __name__ == "__main__":
    measure("with tests/faults", [])
    measure("without tests/faults", ["--ignore=tests/faults"])
