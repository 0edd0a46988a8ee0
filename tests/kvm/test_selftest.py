"""The selftest groups under pytest: one test per check, as `kvmkit selftest` runs
them. A known, measured host deviation (PVM) is an expected failure."""

import json
import os
import subprocess
import sys

import pytest

from kvmkit.testing.checks import run_check
from kvmkit.testing.selftest import GROUPS, select

ALL = select([])


@pytest.mark.parametrize("item", ALL, ids=[s.label for s in ALL])
def test_selftest_check(item):
    result = run_check(item.check)
    if result.status == "SKIP":
        pytest.skip(result.detail)
    if result.status == "DEVIATES":
        pytest.xfail(f"known host deviation: {result.detail}")
    assert result.status == "PASS", (
        f"{item.check.title}: expected {item.check.expect}, observed {result.observed}"
    )


def kvmkit(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "kvmkit", *args], capture_output=True, text=True, timeout=timeout
    )


def test_selftest_memory_cli_prints_a_table_that_fits_the_terminal():
    p = subprocess.run(
        [sys.executable, "-m", "kvmkit", "selftest", "memory"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "100"},
    )
    assert p.returncode == 0, p.stdout + p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].split() == ["result", "check", "expects", "observed"]
    assert len([line for line in lines if line.startswith("PASS ")]) >= 30
    assert "0 fail" in lines[-1]
    assert max(len(line) for line in lines) <= 100


def test_selftest_json_reports_every_check_of_the_groups_asked():
    p = kvmkit("selftest", "vcpu", "faults", "--json")
    assert p.returncode == 0, p.stderr
    report = json.loads(p.stdout)
    assert report["schema"] == "kvmkit-selftest/1"
    groups = {c["group"] for c in report["checks"]}
    assert groups == {"vcpu", "faults"}
    assert len(report["checks"]) == len(GROUPS["vcpu"][1]) + len(GROUPS["faults"][1])
    totals = report["totals"]  # a measured deviation of this host is not a failure
    assert totals["pass"] + totals["deviates"] == len(report["checks"]) and totals["fail"] == 0


def test_selftest_refuses_an_unknown_group_and_lists_the_real_ones():
    p = kvmkit("selftest", "memroy")
    assert p.returncode == 2
    assert (
        "unknown selftest group 'memroy'" in p.stderr and "memory, vcpu, exits, faults" in p.stderr
    )
    assert "Traceback" not in p.stderr


def test_selftest_list_and_filter():
    p = kvmkit("selftest", "-k", "event.", "--list")
    assert p.returncode == 0
    assert [line.split()[0] for line in p.stdout.splitlines()] == [
        f"faults/event.{e}" for e in ("gp", "ud", "pf", "nmi", "mce")
    ]
