"""Fault injection: make a named operation fail on purpose, to prove kvmkit's
failure paths (the VM keeps running, nothing is lost, the error is clear).

A hook point calls `inject("site")` just before the real operation; with no plan
active it does nothing. Sites so far: `snapshot.write`, `snapshot.read`.
"""

from kvmkit.faults.plan import FaultPlan, FaultRule, active_plan, inject

__all__ = ["FaultPlan", "FaultRule", "active_plan", "inject"]
