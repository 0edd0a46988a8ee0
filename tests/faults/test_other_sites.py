"""Hook sites beyond ioctls: memory backend operations and device I/O. Each failure
is reported by name, and nothing is left open or half-changed."""

import errno
import os

import pytest

from kvmkit.errors import KvmkitError
from kvmkit.faults import FaultPlan, FaultRule, active_plan
from kvmkit.machine import MachineConfig, build_for_boot
from kvmkit.memory.layout import MIB


def open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


@pytest.mark.parametrize(
    ("site", "backend", "message"),
    [
        ("memory.create", "memfd", "cannot create 16 MiB of memfd guest memory"),
        ("memory.create", "guest_memfd", "cannot create 16 MiB of guest_memfd guest memory"),
        ("memory.mmap", "guest_memfd", "cannot map 16 MiB of guest_memfd guest memory"),
        ("memory.fallocate", "memfd", "preallocating 16 MiB of memfd memory failed"),
    ],
)
def test_memory_failures_while_building_are_named_and_leave_nothing_open(site, backend, message):
    fds = open_fds()
    config = MachineConfig(
        memory_bytes=16 * MIB, memory_backend=backend, console="none", prealloc=True
    )
    with active_plan(FaultPlan([FaultRule(site, errno.ENOMEM)])) as plan:
        with pytest.raises(KvmkitError) as e:
            build_for_boot(config)
    assert plan.injected and message in str(e.value), str(e.value)
    assert open_fds() == fds


def test_a_failed_discard_keeps_the_memory_and_says_so(vm_factory):
    machine = vm_factory("hello", memory="16M", memory_backend="memfd")
    memory = machine.memory
    gpa = 8 * MIB
    memory.write(gpa, b"kept")
    with active_plan(FaultPlan([FaultRule("memory.punch", errno.EIO)])):
        with pytest.raises(KvmkitError, match="discard 0x800000.*unchanged"):
            memory.discard(gpa, 2 * MIB)
    assert memory.read(gpa, 4) == b"kept"
    memory.discard(gpa, 2 * MIB)  # without the fault it works
    assert memory.read(gpa, 4) == b"\0\0\0\0"


def test_a_device_failure_stops_the_run_naming_the_device(run_guest):
    run = run_guest("hello", memory="16M", faults=["device.io:EIO@nth=5"], timeout_s=20)
    assert run.status == 1
    assert "device serial0 at 0x3f8: Input/output error (EIO)" in run.reason, run.reason


def test_delays_slow_the_run_but_it_completes(run_guest):
    run = run_guest("counter", memory="16M", arg=2, faults=["ioctl:KVM_RUN:delay=1ms@every=5"])
    assert run.status == 0, run.reason
    assert len(run.injected) > 5
