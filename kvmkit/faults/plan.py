"""`FaultPlan`: which hook sites misbehave, how, and on which calls.

A rule reads `WHERE:WHAT@WHEN`, e.g. `ioctl:KVM_RUN:EINTR@every=100`,
`ioctl:KVM_CREATE_VCPU:ENOMEM@once`, `snapshot.write:EIO@nth=3`,
`ioctl:KVM_SET_REGS:EFAULT@p=0.05,seed=7`, `ioctl:KVM_RUN:#GP@nth=5`,
`migration.send:disconnect@nth=2,after=migration.precopy`:

- WHERE: a hook site (`SITES`, plus `ioctl:<KVM ioctl name>` for every KVM ioctl, and
  `cap:<KVM_CAP_ name>` for what KVM_CHECK_EXTENSION answers).
- WHAT:
  - for a `cap:` site, a number: KVM_CHECK_EXTENSION answers it instead of the host's
    value (`cap:GUEST_MEMFD:0@always` is a host without guest_memfd);
  - an errno name (EINTR, EAGAIN, ENOMEM, EIO, EFAULT, ...): the call fails with it;
  - `delay=N[ms|s]`: the call waits first, then runs;
  - `short`: a read or write moves half its bytes (file and stream sites);
  - `disconnect`: the connection drops (stream sites);
  - `corrupt`: one bit of the data sent flips (stream sites);
  - a guest event, before a `KVM_RUN` only: `#GP[=ERROR_CODE]`, `#UD`, `#PF=ADDRESS`,
    `NMI`, `MCE[=ADDRESS]` (see kvmkit/faults/guest_events.py).
- WHEN: `once` (the first call), `always`, `nth=N` (the Nth call), `every=N` (every
  Nth call), `p=P[,seed=S]` (each call with probability P, reproducibly); add
  `after=PHASE` to count calls only once kvmkit has entered that phase (`PHASES`).
"""

import contextlib
import errno as errno_mod
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from kvmkit.errors import ConfigError
from kvmkit.faults.guest_events import GuestEvent, parse_event

if TYPE_CHECKING:
    import random

FILE_SITES = ("snapshot.write", "snapshot.read")
STREAM_SITES = ("migration.send", "migration.recv")
SITES: dict[str, str] = {
    "snapshot.write": "each write to a snapshot file",
    "snapshot.read": "each read of a snapshot file",
    "memory.create": "creating a guest memory backend (guest_memfd, memfd)",
    "memory.mmap": "mapping guest memory into kvmkit",
    "memory.fallocate": "preallocating guest memory",
    "memory.punch": "discarding guest memory (punching a hole)",
    "device.io": "each port or MMIO access a device handles",
    "blk.read": "each virtio-blk read of a drive's backing file (the guest sees IOERR)",
    "blk.write": "each virtio-blk write, flush, discard of a drive's file (IOERR)",
    "tap.read": "each frame read from a virtio-net tap (EBADFD: the tap was deleted)",
    "tap.write": "each frame written to a virtio-net tap (EIO: dropped; EBADFD: deleted)",
    "vsock.host": "each send or receive on a vsock stream's host socket (disconnect: the"
    " peer vanished)",
    "migration.send": "each message sent on a migration stream",
    "migration.recv": "each message received on a migration stream",
}
PHASES: dict[str, str] = {
    "run": "the vCPU threads started",
    "pause": "a pause was requested",
    "resume": "the vCPUs were resumed",
    "snapshot": "a snapshot is being written",
    "restore": "a snapshot is being read",
    "migration.handshake": "a migration connected and is agreeing on the stream",
    "migration.precopy": "memory is being copied while the guest runs",
    "migration.stop-and-copy": "the source paused for the last dirty pages",
    "migration.state": "vCPU, VM and device state is being sent",
    "migration.commit": "the target resumes and confirms",
}


@dataclass
class FaultRule:
    """At `site`, do `action` (fail with `errno`, wait `delay_s`, move half the bytes,
    drop the connection, or deliver `event` to the guest): from the `nth` counted call
    for `times` calls (0: no end), or every `every`th call, or with `probability` under
    `seed`. Calls count only once `after` (a phase) has begun, if set."""

    site: str
    errno: int = 0
    nth: int = 1
    times: int = 1
    every: int = 0
    probability: float = 0.0
    seed: int = 0
    text: str = ""
    action: str = "errno"
    delay_s: float = 0.0
    event: GuestEvent | None = None
    value: int = 0  # the answer of a cap: rule
    after: str = ""
    calls: int = 0
    _rng: "random.Random | None" = field(default=None, repr=False, compare=False)

    def fires(self, call: int) -> bool:
        if self.every:
            return call % self.every == 0
        if self.probability:
            if self._rng is None:
                import random  # only p= rules: a run without them skips it

                self._rng = random.Random(self.seed)
            return self._rng.random() < self.probability
        return call >= self.nth and (self.times == 0 or call < self.nth + self.times)

    def describe(self) -> str:
        if self.action == "errno":
            return errno_mod.errorcode.get(self.errno, str(self.errno))
        if self.action == "delay":
            return f"delay {self.delay_s * 1000:g} ms"
        if self.action == "event" and self.event is not None:
            return self.event.describe()
        if self.action == "answer":
            return f"answers {self.value:#x}"
        return self.action


@dataclass
class Injection:
    rule: FaultRule
    site: str
    call: int  # the site's call number (all calls, counted or not)


@dataclass
class FaultPlan:
    rules: list[FaultRule]
    calls: Counter[str] = field(default_factory=Counter)
    injected: list[tuple[str, int, int]] = field(default_factory=list)  # site, call, errno
    log: list[Injection] = field(default_factory=list)
    phases: list[str] = field(default_factory=list)

    def fire(self, site: str) -> FaultRule | None:
        """Count a call at `site`; the rule that fires on it, or None."""
        self.calls[site] += 1
        chosen = None
        for rule in self.rules:  # every armed rule counts the call; the first to fire acts
            if rule.site != site or (rule.after and rule.after not in self.phases):
                continue
            rule.calls += 1
            if rule.fires(rule.calls) and chosen is None:
                chosen = rule
        if chosen is not None:
            self.injected.append((site, self.calls[site], chosen.errno))
            self.log.append(Injection(chosen, site, self.calls[site]))
        return chosen

    def planned(self, site: str) -> int:
        """Count a call at `site`; the errno to fail it with, or 0 (delays are served)."""
        return errno_after_delay(self.fire(site))

    def check(self, site: str) -> str:
        """The hook: raise the planned OSError, wait the planned delay; returns "short"
        or "corrupt" when the operation should be changed so, else ""."""
        return _act(self.fire(site), site)

    def enter(self, phase: str) -> None:
        if phase not in self.phases:
            self.phases.append(phase)

    def summary(self) -> list[str]:
        """One line per rule: how often it fired, and on which calls."""
        lines = []
        for rule in self.rules:
            calls = [i.call for i in self.log if i.rule is rule]
            shown = ", ".join(map(str, calls[:8])) + (", ..." if len(calls) > 8 else "")
            lines.append(
                f"{rule.text or rule.site}: injected {len(calls)} time(s) of"
                f" {self.calls[rule.site]} call(s)" + (f" (calls {shown})" if calls else "")
            )
        return lines


# -- parsing --------------------------------------------------------------------------------
def _known_site(site: str, text: str) -> None:
    from kvmkit.uapi.caps import Cap
    from kvmkit.uapi.ioctls import ioctl_names

    if site in SITES:
        return
    kind, _, name = site.partition(":")
    if kind == "ioctl" and name in ioctl_names():
        return
    if kind == "cap" and name in Cap.__members__:
        return
    raise ConfigError(
        f"fault rule {text!r}: unknown site {site!r}: use ioctl:<KVM ioctl name> (e.g."
        f" ioctl:KVM_RUN), cap:<capability> (e.g. cap:GUEST_MEMFD) or one of {', '.join(SITES)}"
    )


_DELAY_RE = re.compile(r"^delay=(\d+(?:\.\d+)?)(ms|s)?$", re.IGNORECASE)


def _parse_what(rule: FaultRule, what: str, text: str) -> None:
    """Fill the rule's action from WHAT, refusing actions the site cannot take."""
    site = rule.site
    if site.startswith("cap:"):
        try:
            rule.action, rule.value = "answer", int(what, 0)
        except ValueError:
            raise ConfigError(
                f"fault rule {text!r}: a cap: rule gives the answer KVM_CHECK_EXTENSION"
                f" should return, a number (e.g. {site}:0@always), not {what!r}"
            ) from None
        return
    if m := _DELAY_RE.match(what):
        rule.action, rule.delay_s = "delay", float(m.group(1)) / (1 if m.group(2) == "s" else 1000)
    elif what.lower() in ("short", "disconnect", "corrupt"):
        rule.action = what.lower()
        allowed = STREAM_SITES + (FILE_SITES if rule.action == "short" else ())
        if rule.action == "disconnect":
            allowed += ("vsock.host",)
        if site not in allowed:
            raise ConfigError(
                f"fault rule {text!r}: {rule.action} applies to {', '.join(allowed)}, not {site}"
            )
    elif (event := parse_event(what, text)) is not None:
        if site != "ioctl:KVM_RUN":
            raise ConfigError(
                f"fault rule {text!r}: guest events are delivered before a KVM_RUN: write"
                f" ioctl:KVM_RUN:{what}@..."
            )
        rule.action, rule.event = "event", event
    else:
        err = getattr(errno_mod, what.upper(), None)
        if not isinstance(err, int):
            raise ConfigError(
                f"fault rule {text!r}: {what!r} is not an errno name (EINTR, ENOMEM, ...),"
                " delay=N[ms|s], short, disconnect, or a guest event (#GP, #UD, #PF=ADDR,"
                " NMI, MCE)"
            )
        rule.errno = err


def parse_rule(text: str) -> FaultRule:
    """A rule from `WHERE:WHAT@WHEN`; ConfigError pointing at the bad part."""
    where_what, at, when = text.partition("@")
    site, _, what = where_what.rpartition(":")
    if not at or not site or not what:
        raise ConfigError(
            f"fault rule {text!r} is not WHERE:WHAT@WHEN, e.g. ioctl:KVM_RUN:EINTR@every=100"
        )
    _known_site(site, text)
    rule = FaultRule(site, text=text)
    _parse_what(rule, what, text)
    fields: dict[str, str] = {}
    for part in when.split(","):
        key, eq, value = part.partition("=")
        if key in ("once", "always") and not eq:
            fields[key] = ""
        elif eq and key in ("nth", "every", "p", "seed", "after"):
            fields[key] = value
        else:
            raise ConfigError(
                f"fault rule {text!r}: {part!r} is not once, always, nth=N, every=N, p=P,"
                " seed=S or after=PHASE"
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
    rule.after = fields.get("after", "")
    if rule.after and rule.after not in PHASES:
        raise ConfigError(
            f"fault rule {text!r}: unknown phase {rule.after!r}: one of {', '.join(PHASES)}"
        )
    return rule


MAX_PLAN_BYTES = 1 << 20


def load_plan(rules: list[str], toml_path: str | None = None) -> FaultPlan:
    """Rules from the command line and from a TOML file of [[fault]] tables with
    `rule = "WHERE:WHAT@WHEN"`."""
    texts = list(rules)
    if toml_path:
        import tomllib  # only plans from a file

        path = Path(toml_path)
        try:
            if path.stat().st_size > MAX_PLAN_BYTES:
                raise ConfigError(
                    f"fault plan {toml_path} is over {MAX_PLAN_BYTES >> 10} KiB: a plan is a"
                    " short list of rules"
                )
            data = tomllib.loads(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError:
            raise ConfigError(f"fault plan {toml_path} is not UTF-8 text (TOML is)") from None
        except FileNotFoundError:
            raise ConfigError(
                f"fault plan {toml_path} does not exist: give the path of a TOML file of"
                ' [[fault]] tables (rule = "WHERE:WHAT@WHEN")'
            ) from None
        except OSError as e:
            raise ConfigError(f"cannot read fault plan {toml_path}: {e.strerror or e}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"fault plan {toml_path} is not valid TOML: {e}") from None
        faults = data.get("fault", [])
        if not isinstance(faults, list):
            raise ConfigError(
                f'fault plan {toml_path}: "fault" must be [[fault]] tables, each with'
                ' rule = "WHERE:WHAT@WHEN"'
            )
        for i, entry in enumerate(faults):
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
        rule = plan.fire(site)
    return errno_after_delay(rule)


def planned_rule(site: str) -> FaultRule | None:
    """For hook points that act themselves (the vCPU loop's guest events): the rule that
    fires on this call, or None. Delays are not served here."""
    plan = _active
    if plan is None:
        return None
    with _lock:
        return plan.fire(site)


def capability_answer(name: str, real: int) -> int:
    """The `cap:<name>` hook (KVM_CHECK_EXTENSION, in kvmkit/kvm/ioctl.py): the answer
    the plan gives for this capability, else the host's own `real` one."""
    plan = _active
    if plan is None:
        return real
    with _lock:
        rule = plan.fire(f"cap:{name}")
    return rule.value if rule is not None and rule.action == "answer" else real


def inject(site: str) -> str:
    """A hook point: raises the planned OSError, serves a delay; returns "short" (move
    half the bytes) or "corrupt" (flip a bit of them) when the plan says so, else ""."""
    plan = _active
    if plan is None:
        return ""
    with _lock:
        rule = plan.fire(site)
    return _act(rule, site)


def errno_after_delay(rule: FaultRule | None) -> int:
    """Serve a delay rule; the errno an errno rule fails with, else 0."""
    if rule is not None and rule.action == "delay":
        time.sleep(rule.delay_s)
    return rule.errno if rule is not None and rule.action == "errno" else 0


def _act(rule: FaultRule | None, site: str) -> str:
    """Carry out `rule` at a raising hook point; "short" or "corrupt" for the caller."""
    if rule is None:
        return ""
    if rule.action == "errno":
        raise OSError(rule.errno, os.strerror(rule.errno), f"fault injected at {site}")
    if rule.action == "disconnect":
        raise ConnectionResetError(
            errno_mod.ECONNRESET, "connection dropped", f"fault injected at {site}"
        )
    if rule.action == "delay":
        time.sleep(rule.delay_s)
    return rule.action if rule.action in ("short", "corrupt") else ""


def enter_phase(phase: str) -> None:
    """kvmkit entered `phase` (one of PHASES): arms the rules written `after=phase`."""
    plan = _active
    if plan is not None:
        with _lock:
            plan.enter(phase)


@contextlib.contextmanager
def active_plan(plan: FaultPlan) -> Iterator[FaultPlan]:
    global _active
    previous, _active = _active, plan
    try:
        yield plan
    finally:
        _active = previous
