"""Fault injection: make a named operation fail on purpose, to prove kvmkit's
failure paths (the VM keeps running, nothing is lost, the error is clear), and
describe guest-visible faults (exceptions, NMIs, machine checks) for test guests
(delivered by kvmkit/kvm/guest_events.py).

A hook point asks the active plan just before the real operation; with no plan
active it does nothing. Sites: `ioctl:<name>` for every KVM ioctl (kvmkit/kvm/ioctl.py
and the vCPU loop's KVM_RUN), `cap:<name>` for the answers of KVM_CHECK_EXTENSION (a
host without a capability, on demand), and the named sites in `SITES` (snapshot files,
memory backends, device I/O, migration streams). See plan.py for the rule syntax.
"""

from kvmkit.faults.guest_events import GuestEvent, parse_event
from kvmkit.faults.plan import (
    PHASES,
    SITES,
    FaultPlan,
    FaultRule,
    active,
    active_plan,
    capability_answer,
    enter_phase,
    errno_after_delay,
    inject,
    load_plan,
    parse_rule,
    planned_errno,
    planned_rule,
)

__all__ = [
    "PHASES",
    "SITES",
    "FaultPlan",
    "FaultRule",
    "GuestEvent",
    "active",
    "active_plan",
    "capability_answer",
    "enter_phase",
    "errno_after_delay",
    "inject",
    "load_plan",
    "parse_event",
    "parse_rule",
    "planned_errno",
    "planned_rule",
]
