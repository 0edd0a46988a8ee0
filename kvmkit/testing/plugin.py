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
- `test_kernel` (session): the project's built test kernel (`kvmkit kernel build`);
  tests that use it skip with the reason when it is not built, or fail when
  KVMKIT_REQUIRE_LINUX=1 (CI).
- `linux_snapshot` (session): the test kernel booted once (1 vCPU, 128 MiB, the default
  backend) and snapshotted at its init's prompt; a `LinuxSnapshot` (path, boot_s).
- `linux_guest`: a `kvmkit.testing.linux.LinuxGuest` restored from `linux_snapshot` in
  milliseconds, at the prompt: `guest.command("cpus")`, `guest.send(...)`,
  `guest.finish()`; closed after the test.
"""

import os
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from kvmkit.faults import FaultPlan, active_plan, load_plan
from kvmkit.kvm import Kvm
from kvmkit.machine import Machine
from kvmkit.testing.harness import GuestRun, build_asm, built_machine, kvm_unavailable_reason
from kvmkit.testing.harness import run_guest as run_guest_now

if TYPE_CHECKING:
    from kvmkit.guests.linux.build import TestKernel
    from kvmkit.testing.linux import LinuxGuest


@pytest.fixture
def kvm() -> Iterator[Kvm]:
    """The host's /dev/kvm as a `kvmkit.kvm.Kvm`; the test skips, with the reason, where
    /dev/kvm is missing or not accessible."""
    reason = kvm_unavailable_reason()
    if reason is not None:
        pytest.skip(f"needs KVM: {reason}")
    with Kvm() as k:
        yield k


@pytest.fixture
def guest_asm(tmp_path: Path) -> Callable[..., Path]:
    """`guest_asm(source, name="guest")`: a long-mode guest assembled from Intel-syntax
    text (it may call the guest library: puts, putdec, exit, ...); the path of its flat
    binary, for `run_guest` or `vm_factory`."""

    def build(source: str, name: str = "guest") -> Path:
        return build_asm(source, tmp_path, name)

    return build


@pytest.fixture
def run_guest(kvm: Kvm) -> Callable[..., GuestRun]:
    """`run_guest(guest, memory="64M", vcpus=1, memory_backend="auto", arg=0, faults=(),
    timeout_s=60)`: run a guest (built-in name or path) to its end; a `GuestRun` with
    status, reason, exits, console, lines and injected faults."""
    return run_guest_now


@pytest.fixture
def vm_factory(kvm: Kvm) -> Iterator[Callable[..., Machine]]:
    """`vm_factory(guest, **options)`: a built `kvmkit.machine.Machine` to drive yourself
    (run, pause, memory, vCPU state), closed after the test."""
    with ExitStack() as stack:

        def make(guest: str | Path = "hello", **options: object) -> Machine:
            return stack.enter_context(built_machine(guest, **options))

        yield make


@pytest.fixture
def fault_plan() -> Iterator[Callable[..., FaultPlan]]:
    """`fault_plan(*rules)`: activate fault rules (`WHERE:WHAT@WHEN`) for the rest of the
    test; the `FaultPlan`, whose `log` lists every injection."""
    with ExitStack() as stack:

        def activate(*rules: str) -> FaultPlan:
            return stack.enter_context(active_plan(load_plan(list(rules))))

        yield activate


REQUIRE_LINUX_ENV = "KVMKIT_REQUIRE_LINUX"


@dataclass(frozen=True)
class LinuxSnapshot:
    path: Path
    boot_s: float  # from build to the init's banner


@pytest.fixture(scope="session")
def test_kernel() -> "TestKernel":
    """The project's test kernel, built by `kvmkit kernel build` (cached)."""
    from kvmkit.guests.linux.build import find_test_kernel, why_unbuildable

    reason = kvm_unavailable_reason()
    if reason is not None:
        pytest.skip(f"needs KVM: {reason}")
    kernel = find_test_kernel()
    if kernel is None:
        why = why_unbuildable() or "run 'kvmkit kernel build' (about 10 minutes, once)"
        message = f"needs the test kernel, which is not built: {why}"
        if os.environ.get(REQUIRE_LINUX_ENV) == "1":
            pytest.fail(message)
        pytest.skip(message)
    return kernel


@pytest.fixture(scope="session")
def linux_snapshot(
    test_kernel: "TestKernel", tmp_path_factory: pytest.TempPathFactory
) -> LinuxSnapshot:
    """The test kernel booted once and snapshotted at its init's prompt."""
    from kvmkit.testing.linux import boot_test_kernel, snapshot_at_prompt

    path = tmp_path_factory.mktemp("linux") / "booted.snap"
    start = time.monotonic()
    guest, _ = boot_test_kernel(test_kernel, cmdline="kvmkit.test=booted-once")
    boot_s = time.monotonic() - start
    snapshot_at_prompt(guest, path)
    return LinuxSnapshot(path, boot_s)


@pytest.fixture
def linux_guest(linux_snapshot: LinuxSnapshot) -> Iterator["LinuxGuest"]:
    """A Linux guest at its init's prompt, restored from the session's snapshot."""
    from kvmkit.testing.linux import restore_guest

    guest = restore_guest(linux_snapshot.path)
    try:
        yield guest
    finally:
        guest.close()
