"""Checks: a behaviour of this host's KVM, the outcome it should have, and what was seen.

A check returns the outcome it observed ("ok", an errno name, "SIGBUS", a value); it
passes when that equals its `expect`. A check whose behaviour is a known, measured
deviation of this host (PVM) from upstream reports DEVIATES instead of FAIL; one that
cannot run here raises `Skip` with the reason.
"""

import errno
import shutil
import textwrap
from collections.abc import Callable
from dataclasses import dataclass

from kvmkit.kvm import KvmError


class Skip(Exception):
    """The check cannot run on this host; the message says why."""


@dataclass(frozen=True)
class Check:
    name: str
    title: str
    expect: str
    run: Callable[[], str]
    # An outcome this host is known to give instead, and why (a measured deviation).
    deviation: tuple[str, str] | None = None


@dataclass(frozen=True)
class CheckResult:
    check: Check
    observed: str
    status: str  # PASS, FAIL, SKIP, DEVIATES
    detail: str = ""


def errno_name(code: int) -> str:
    if code == errno.EOPNOTSUPP:
        return "EOPNOTSUPP"  # the same number as ENOTSUP on Linux; the kernel says EOPNOTSUPP
    return errno.errorcode.get(code, str(code))


def outcome(fn: Callable[[], object]) -> str:
    """ "ok" if fn() returns, else the errno name of the OSError/KvmError it raised."""
    try:
        fn()
    except KvmError as e:
        return errno_name(e.errno)
    except OSError as e:
        return errno_name(e.errno or 0)
    return "ok"


def all_same(outcomes: list[str]) -> str:
    """One outcome if every case agreed, else each distinct one with a count."""
    distinct = sorted(set(outcomes))
    if len(distinct) == 1:
        return distinct[0]
    return ", ".join(f"{o} x{outcomes.count(o)}" for o in distinct)


def run_check(check: Check) -> CheckResult:
    try:
        observed = check.run()
    except Skip as e:
        return CheckResult(check, "-", "SKIP", str(e))
    except Exception as e:  # a check that breaks is a failure, reported, not a crash
        return CheckResult(check, f"{type(e).__name__}: {e}", "FAIL")
    if observed == check.expect:
        return CheckResult(check, observed, "PASS")
    if check.deviation is not None and observed == check.deviation[0]:
        return CheckResult(check, observed, "DEVIATES", check.deviation[1])
    return CheckResult(check, observed, "FAIL")


def format_table(results: list[tuple[str, CheckResult]], width: int | None = None) -> str:
    """A plain-text table of (label, result) rows, then the totals; the observed column
    wraps so no line is wider than `width` (default: the terminal's)."""
    if width is None:
        width = shutil.get_terminal_size((100, 24)).columns
    rows = [("result", "check", "expects", "observed")]
    for label, r in results:
        observed = r.observed if not r.detail else f"{r.observed} ({r.detail})"
        rows.append((r.status, label, r.check.expect, observed))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    left = sum(widths) + 2 * 3
    room = max(20, width - left)
    lines = []
    for i, row in enumerate(rows):
        head = "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False))
        wrapped = textwrap.wrap(row[3], room, break_on_hyphens=False) or [""]
        lines.append(f"{head}  {wrapped[0]}".rstrip())
        lines.extend(" " * left + more for more in wrapped[1:])
        if i == 0:
            lines.append("  ".join("-" * w for w in widths) + "  " + "-" * min(room, 8))
    statuses = [r.status for _, r in results]
    totals = {s: statuses.count(s) for s in ("PASS", "FAIL", "SKIP", "DEVIATES")}
    lines.append("")
    lines.append(", ".join(f"{n} {s.lower()}" for s, n in totals.items() if n or s == "FAIL"))
    return "\n".join(lines)
