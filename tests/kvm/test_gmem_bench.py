"""The guest_memfd test bench under pytest: one test per check, as `kvmkit selftest
memory` runs them. A known, measured host deviation (PVM) is an expected failure."""

import subprocess
import sys

import pytest

from kvmkit.testing.gmem_bench import CHECKS, run_check


@pytest.mark.parametrize("check", CHECKS, ids=[c.name for c in CHECKS])
def test_gmem_check(check):
    result = run_check(check)
    if result.status == "SKIP":
        pytest.skip(result.detail)
    if result.status == "DEVIATES":
        pytest.xfail(f"known host deviation: {result.detail}")
    assert result.status == "PASS", (
        f"{check.title}: expected {check.expect}, observed {result.observed}"
    )


def test_selftest_memory_cli_prints_a_table():
    p = subprocess.run(
        [sys.executable, "-m", "kvmkit", "selftest", "memory"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].split() == ["check", "expects", "observed", "result"]
    assert len([line for line in lines if line.endswith("PASS")]) >= 30
    assert "0 fail" in lines[-1]
