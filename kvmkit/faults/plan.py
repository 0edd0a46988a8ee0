"""`FaultPlan`: which hook sites fail, with which errno, on which calls."""

import contextlib
import os
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field


@dataclass(frozen=True)
class FaultRule:
    """Fail the `nth` call (1-based) at `site` with `errno`, and the `times - 1` calls
    after it (times=0: every call from the nth on)."""

    site: str
    errno: int
    nth: int = 1
    times: int = 1

    def fires(self, call: int) -> bool:
        return call >= self.nth and (self.times == 0 or call < self.nth + self.times)


@dataclass
class FaultPlan:
    rules: list[FaultRule]
    calls: Counter[str] = field(default_factory=Counter)
    injected: list[tuple[str, int, int]] = field(default_factory=list)  # site, call, errno

    def check(self, site: str) -> None:
        self.calls[site] += 1
        call = self.calls[site]
        for rule in self.rules:
            if rule.site == site and rule.fires(call):
                self.injected.append((site, call, rule.errno))
                raise OSError(rule.errno, os.strerror(rule.errno), f"fault injected at {site}")


_lock = threading.Lock()
_active: FaultPlan | None = None


def inject(site: str) -> None:
    """A hook point: raises the planned OSError when the active plan says so."""
    plan = _active
    if plan is not None:
        with _lock:
            plan.check(site)


@contextlib.contextmanager
def active_plan(plan: FaultPlan) -> Iterator[FaultPlan]:
    global _active
    previous, _active = _active, plan
    try:
        yield plan
    finally:
        _active = previous
