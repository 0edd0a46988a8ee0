"""`kvmkit selftest`: the bundled behaviour checks, by group, against this host."""

import json
import platform
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kvmkit.testing import dirty_bench, exit_bench, fault_bench, gmem_bench, vcpu_bench
from kvmkit.testing.checks import Check, CheckResult, run_check

GROUPS: dict[str, tuple[str, list[Check]]] = {
    "memory": (
        "guest_memfd: creation, mmap, fallocate, slot binding, a running guest",
        gmem_bench.CHECKS,
    ),
    "vcpu": (
        "vCPU ids, state round trips (registers, MSRs, CPUID, events, XSAVE), single-step",
        vcpu_bench.CHECKS,
    ),
    "exits": (
        "port and MMIO exits, string I/O, HLT, shutdown, debug exit, unclaimed accesses",
        exit_bench.CHECKS,
    ),
    "faults": (
        "guest events (#GP, #UD, #PF, NMI, MCE), retried KVM_RUN errors, failed builds",
        fault_bench.CHECKS,
    ),
    "dirty": (
        "dirty tracking for migration: bitmap and ring, memfd and the guest_memfd view",
        dirty_bench.CHECKS,
    ),
}


@dataclass(frozen=True)
class Selected:
    group: str
    check: Check

    @property
    def label(self) -> str:
        return f"{self.group}/{self.check.name}"


def select(groups: list[str], pattern: str = "") -> list[Selected]:
    """The checks of `groups` (all when empty) whose label contains `pattern`."""
    return [
        Selected(g, c)
        for g in (groups or list(GROUPS))
        for c in GROUPS[g][1]
        if pattern in f"{g}/{c.name}"
    ]


def run_selected(
    selected: list[Selected], progress: Callable[[int, Selected], None] | None = None
) -> list[tuple[Selected, CheckResult]]:
    out = []
    for i, item in enumerate(selected, 1):
        if progress is not None:
            progress(i, item)
        out.append((item, run_check(item.check)))
    return out


def counts(results: list[tuple[Selected, CheckResult]]) -> dict[str, int]:
    return {s: sum(r.status == s for _, r in results) for s in ("PASS", "FAIL", "SKIP", "DEVIATES")}


def to_json(results: list[tuple[Selected, CheckResult]]) -> dict[str, Any]:
    """Schema kvmkit-selftest/1: host, totals, and one record per check."""
    return {
        "schema": "kvmkit-selftest/1",
        "host": {"kernel": platform.release(), "machine": platform.machine()},
        "totals": {k.lower(): v for k, v in counts(results).items()},
        "checks": [
            {
                "group": s.group,
                "name": s.check.name,
                "title": s.check.title,
                "expect": s.check.expect,
                "observed": r.observed,
                "status": r.status,
                "detail": r.detail,
            }
            for s, r in results
        ],
    }


def dumps(results: list[tuple[Selected, CheckResult]]) -> str:
    return json.dumps(to_json(results), indent=2)
