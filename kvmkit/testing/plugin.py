"""kvmkit's pytest plugin (registered by the `pytest11` entry point, so installing
kvmkit makes these fixtures available to any test suite):

- `kvm`: the host's /dev/kvm as a `kvmkit.kvm.Kvm`; tests that use it (or any fixture
  below) are skipped, with the reason, where /dev/kvm is missing or not accessible.
- `guest_asm(source, name="guest")`: a long-mode guest built from assembly text;
  returns the path of its flat binary (see `kvmkit.testing.harness.build_asm`).
- `run_guest(guest, memory=, vcpus=, memory_backend=, arg=, faults=, timeout_s=)`: run a
  guest (a built-in name or a path) to the end; returns a `GuestRun` with `status`,
  `reason`, `exits`, `console`, `lines` and `injected`.
- `vm_factory(guest, ...)`: a built `kvmkit.machine.Machine` to drive yourself (pause,
  snapshot, memory, vCPU state); closed after the test.
- `fault_plan(*rules)`: activate fault rules (`WHERE:WHAT@WHEN`) for the rest of the
  test; returns the `FaultPlan`, whose `log` lists every injection.
"""

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from kvmkit.faults import FaultPlan, active_plan, load_plan
from kvmkit.kvm import Kvm
from kvmkit.machine import Machine
from kvmkit.testing.harness import GuestRun, build_asm, built_machine, kvm_unavailable_reason
from kvmkit.testing.harness import run_guest as run_guest_now


@pytest.fixture
def kvm() -> Iterator[Kvm]:
    reason = kvm_unavailable_reason()
    if reason is not None:
        pytest.skip(f"needs KVM: {reason}")
    with Kvm() as k:
        yield k


@pytest.fixture
def guest_asm(tmp_path: Path) -> Callable[..., Path]:
    def build(source: str, name: str = "guest") -> Path:
        return build_asm(source, tmp_path, name)

    return build


@pytest.fixture
def run_guest(kvm: Kvm) -> Callable[..., GuestRun]:
    return run_guest_now


@pytest.fixture
def vm_factory(kvm: Kvm) -> Iterator[Callable[..., Machine]]:
    with ExitStack() as stack:

        def make(guest: str | Path = "hello", **options: object) -> Machine:
            return stack.enter_context(built_machine(guest, **options))

        yield make


@pytest.fixture
def fault_plan() -> Iterator[Callable[..., FaultPlan]]:
    with ExitStack() as stack:

        def activate(*rules: str) -> FaultPlan:
            return stack.enter_context(active_plan(load_plan(list(rules))))

        yield activate
