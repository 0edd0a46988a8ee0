"""Every KVM ioctl call site on the create, run and teardown paths, failed in turn.

The sites are enumerated by running the machine once under an empty plan (which
counts every call per site), not hand-picked. For each site, its first call (and its
last, when it has several) fails with EIO, and the test asserts what a user would:
the error names the operation, no fd is left open, no thread is left running, and a
new VM can be created afterwards."""

import errno
import os
import threading
import time

import pytest

from kvmkit.errors import KvmkitError
from kvmkit.faults import FaultPlan, FaultRule, active_plan
from kvmkit.kvm import Kvm
from kvmkit.machine import MachineConfig, build_for_boot
from kvmkit.machine.result import EXIT_HOST_ERROR

CONFIG = MachineConfig(
    guest="counter", guest_arg=30, vcpus=2, memory_bytes=16 << 20, console="none"
)


def open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


def run_once() -> tuple[int | None, str]:
    """Build, run and close the machine; (status, message) of how it ended."""
    try:
        with build_for_boot(CONFIG) as m:
            result = m.run()
        return result.status, result.reason
    except KvmkitError as e:
        return None, str(e)


def pause_resume_once() -> tuple[int | None, str]:
    """Build, run on a thread, pause, resume, let it finish, close."""
    try:
        with build_for_boot(CONFIG) as m:
            results = []
            t = threading.Thread(target=lambda: results.append(m.run()))
            t.start()
            while not m.running and t.is_alive():
                time.sleep(0.0005)
            if m.running:
                m.pause()
                m.resume()
            t.join()
        return results[0].status, results[0].reason
    except KvmkitError as e:
        return None, str(e)


SCENARIOS = {"run": run_once, "pause-resume": pause_resume_once}


def enumerate_sites() -> list[tuple[str, str, int]]:
    cases = []
    for scenario, run in SCENARIOS.items():
        plan = FaultPlan([])
        with active_plan(plan):
            status, message = run()
        assert status == 0, message
        for site, calls in sorted(plan.calls.items()):
            if site.startswith("ioctl:"):
                cases.append((scenario, site, 1))
                if calls > 1:
                    cases.append((scenario, site, calls))
    return cases


CASES = enumerate_sites() if os.access("/dev/kvm", os.R_OK | os.W_OK) else []


def test_the_enumeration_covers_create_run_and_teardown():
    sites = {site for _, site, _ in CASES}
    assert {
        "ioctl:KVM_CREATE_VM",
        "ioctl:KVM_CREATE_VCPU",
        "ioctl:KVM_RUN",
        "ioctl:KVM_SET_USER_MEMORY_REGION2",
    } <= sites, sites


@pytest.mark.parametrize(
    ("scenario", "site", "nth"), CASES, ids=[f"{c}-{s[6:]}#{n}" for c, s, n in CASES]
)
def test_failure_at_each_ioctl_call(scenario, site, nth):
    fds, threads = open_fds(), threading.active_count()
    plan = FaultPlan([FaultRule(site, errno.EIO, nth=nth)])
    with active_plan(plan):
        status, message = SCENARIOS[scenario]()
    name = site.removeprefix("ioctl:")
    if plan.injected:
        if status is None:  # refused while building or tearing down
            assert name in message and "EIO" in message, message
        elif status != 0:
            assert status == EXIT_HOST_ERROR and name in message, message
    assert open_fds() == fds, f"fds left open after {site} #{nth} failed"
    assert threading.active_count() == threads, "a thread was left running"
    with Kvm() as kvm, kvm.create_vm() as vm:  # the host is still usable
        vm.create_vcpu(0)


@pytest.mark.parametrize("errno_name", ["EINTR", "EAGAIN"])
def test_transient_kvm_run_errors_are_retried_and_the_guest_completes(errno_name):
    plan = FaultPlan([FaultRule("ioctl:KVM_RUN", getattr(errno, errno_name), every=7)])
    with active_plan(plan):
        status, message = run_once()
    assert status == 0, message
    assert len(plan.injected) > 3
