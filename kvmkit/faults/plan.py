"""`FaultPlan`: which hook sites fail, with which errno, on which calls.

A rule reads `WHERE:WHAT@WHEN`, e.g. `ioctl:KVM_RUN:EINTR@every=100`,
`ioctl:KVM_CREATE_VCPU:ENOMEM@once`, `snapshot.write:EIO@nth=3`,
`ioctl:KVM_SET_REGS:EFAULT@p=0.05,seed=7`:

- WHERE: `ioctl:<KVM ioctl name>` (every KVM ioctl, in kvmkit/kvm/ and the vCPU loop),
  `snapshot.write`, `snapshot.read`.
- WHAT: an errno name (EINTR, EAGAIN, ENOMEM, EIO, EFAULT, ...).
- WHEN: `once` (the first call), `always`, `nth=N` (the Nth call), `every=N` (every
  Nth call), `p=P[,seed=S]` (each call with probability P, reproducibly).
"""

import contextlib
import errno as errno_mod
import os
import random
import threading
import tomllib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from kvmkit.errors import ConfigError

FILE_SITES = ("snapshot.write", "snapshot.read")


@dataclass
class FaultRule:
    """Fail calls at `site` with `errno`: from the `nth` call for `times` calls (0: no
    end), or every `every`th call, or with `probability` under `seed`."""

    site: str
    errno: int
    nth: int = 1
    times: int = 1
    every: int = 0
    probability: float = 0.0
    seed: int = 0
    text: str = ""
    _rng: random.Random | None = field(default=None, repr=False, compare=False)

    def fires(self, call: int) -> bool:
        if self.every:
            return call % self.every == 0
        if self.probability:
            if self._rng is None:
                self._rng = random.Random(self.seed)
            return self._rng.random() < self.probability
        return call >= self.nth and (self.times == 0 or call < self.nth + self.times)


@dataclass
class FaultPlan:
    rules: list[FaultRule]
    calls: Counter[str] = field(default_factory=Counter)
    injected: list[tuple[str, int, int]] = field(default_factory=list)  # site, call, errno

    def planned(self, site: str) -> int:
        """Count a call at `site`; the errno to fail it with, or 0."""
        self.calls[site] += 1
        call = self.calls[site]
        for rule in self.rules:
            if rule.site == site and rule.fires(call):
                self.injected.append((site, call, rule.errno))
                return rule.errno
        return 0

    def check(self, site: str) -> None:
        err = self.planned(site)
        if err:
            raise OSError(err, os.strerror(err), f"fault injected at {site}")

    def summary(self) -> list[str]:
        """One line per rule: how often it fired, and on which calls."""
        lines = []
        for rule in self.rules:
            calls = [c for s, c, e in self.injected if s == rule.site and e == rule.errno]
            shown = ", ".join(map(str, calls[:8])) + (", ..." if len(calls) > 8 else "")
            lines.append(
                f"{rule.text or rule.site}: injected {len(calls)} time(s) of"
                f" {self.calls[rule.site]} call(s)" + (f" (calls {shown})" if calls else "")
            )
        return lines


# -- parsing --------------------------------------------------------------------------------
def _known_site(site: str, text: str) -> None:
    from kvmkit.uapi.ioctls import ioctl_names

    if site in FILE_SITES:
        return
    kind, _, name = site.partition(":")
    if kind == "ioctl" and name in ioctl_names():
        return
    raise ConfigError(
        f"fault rule {text!r}: unknown site {site!r}: use ioctl:<KVM ioctl name> (e.g."
        f" ioctl:KVM_RUN) or one of {', '.join(FILE_SITES)}"
    )


def parse_rule(text: str) -> FaultRule:
    """A rule from `WHERE:WHAT@WHEN`; ConfigError pointing at the bad part."""
    where_what, at, when = text.partition("@")
    site, _, what = where_what.rpartition(":")
    if not at or not site or not what:
        raise ConfigError(
            f"fault rule {text!r} is not WHERE:WHAT@WHEN, e.g. ioctl:KVM_RUN:EINTR@every=100"
        )
    _known_site(site, text)
    err = getattr(errno_mod, what.upper(), None)
    if not isinstance(err, int):
        raise ConfigError(
            f"fault rule {text!r}: {what!r} is not an errno name (EINTR, ENOMEM, ...)"
        )
    rule = FaultRule(site, err, text=text)
    fields: dict[str, str] = {}
    for part in when.split(","):
        key, eq, value = part.partition("=")
        if key in ("once", "always") and not eq:
            fields[key] = ""
        elif eq and key in ("nth", "every", "p", "seed"):
            fields[key] = value
        else:
            raise ConfigError(
                f"fault rule {text!r}: {part!r} is not once, always, nth=N, every=N, p=P or seed=S"
            )
    try:
        if "always" in fields:
            rule.times = 0
        if "nth" in fields:
            rule.nth = int(fields["nth"])
        if "every" in fields:
            rule.every = int(fields["every"])
        if "p" in fields:
            rule.probability = float(fields["p"])
        rule.seed = int(fields.get("seed", "0"))
    except ValueError as e:
        raise ConfigError(f"fault rule {text!r}: {e}") from None
    if rule.nth < 1 or rule.every < 0 or not 0 <= rule.probability <= 1:
        raise ConfigError(f"fault rule {text!r}: nth >= 1, every >= 1 and 0 <= p <= 1")
    return rule


def load_plan(rules: list[str], toml_path: str | None = None) -> FaultPlan:
    """Rules from the command line and from a TOML file of [[fault]] tables with
    `rule = "WHERE:WHAT@WHEN"`."""
    texts = list(rules)
    if toml_path:
        try:
            data = tomllib.loads(Path(toml_path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"fault plan {toml_path}: {e}") from None
        for i, entry in enumerate(data.get("fault", [])):
            if not isinstance(entry, dict) or not isinstance(entry.get("rule"), str):
                raise ConfigError(f'fault plan {toml_path}: [[fault]] {i + 1} needs rule = "..."')
            texts.append(entry["rule"])
    return FaultPlan([parse_rule(t) for t in texts])


# -- the active plan ----------------------------------------------------------------------
_lock = threading.Lock()
_active: FaultPlan | None = None


def active() -> FaultPlan | None:
    return _active


def planned_errno(site: str) -> int:
    """For hook points that fail by errno (ioctls): 0, or the errno to fail with."""
    plan = _active
    if plan is None:
        return 0
    with _lock:
        return plan.planned(site)


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
