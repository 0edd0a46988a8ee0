"""Fault injection: make a named operation fail on purpose, to prove kvmkit's
failure paths (the VM keeps running, nothing is lost, the error is clear).

A hook point asks the active plan just before the real operation; with no plan
active it does nothing. Sites: `ioctl:<name>` for every KVM ioctl (kvmkit/kvm/ioctl.py
and the vCPU loop's KVM_RUN), `snapshot.write`, `snapshot.read`.
"""

from kvmkit.faults.plan import (
    FaultPlan,
    FaultRule,
    active,
    active_plan,
    inject,
    load_plan,
    parse_rule,
    planned_errno,
)

__all__ = [
    "FaultPlan",
    "FaultRule",
    "active",
    "active_plan",
    "inject",
    "load_plan",
    "parse_rule",
    "planned_errno",
]
