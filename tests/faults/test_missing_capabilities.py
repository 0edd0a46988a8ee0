"""Hosts without a capability, made on demand with `cap:<NAME>:<answer>` fault rules
(KVM_CHECK_EXTENSION answers as told; everything else is the real KVM): kvmkit takes
its fallback, says why, and the guest still runs; where there is no fallback the
refusal names the capability and the fix."""

import subprocess
import sys
import time

import pytest

from kvmkit.errors import KvmkitError
from kvmkit.faults import active_plan, load_plan
from kvmkit.machine import MachineConfig, build_for_boot
from kvmkit.memory.layout import MIB
from kvmkit.testing.dirty_bench import DirtyingGuest


def hello(backend: str = "auto", **kw: object) -> MachineConfig:
    return MachineConfig(memory_bytes=16 * MIB, memory_backend=backend, console="none", **kw)


@pytest.mark.parametrize(
    ("rule", "why"),
    [
        ("cap:GUEST_MEMFD:0@always", "KVM_CAP_GUEST_MEMFD is 0"),
        (
            "cap:GUEST_MEMFD_FLAGS:0@always",
            "KVM_CAP_GUEST_MEMFD_FLAGS is 0x0, without MMAP|INIT_SHARED (0x3)",
        ),
        ("cap:USER_MEMORY2:0@always", "KVM_CAP_USER_MEMORY2 is 0"),
    ],
)
def test_without_a_mappable_guest_memfd_the_default_is_memfd_and_says_why(rule, why):
    with active_plan(load_plan([rule])), build_for_boot(hello()) as m:
        result = m.run()
    assert result.status == 0, result.reason
    assert result.backend == "memfd"
    assert result.backend_reason == f"fallback: guest_memfd unusable ({why})"


def test_asking_for_guest_memfd_there_is_refused_with_the_fix():
    with active_plan(load_plan(["cap:GUEST_MEMFD_FLAGS:0x1@always"])):
        with pytest.raises(KvmkitError, match="use --memory-backend memfd"):
            build_for_boot(hello("guest_memfd"))


def test_the_old_memory_region_ioctl_serves_slots_and_dirty_logging():
    """Without KVM_CAP_USER_MEMORY2 every slot, and the dirty-logging flag change, goes
    through KVM_SET_USER_MEMORY_REGION; the dirty log still sees the guest's writes."""
    with active_plan(load_plan(["cap:USER_MEMORY2:0@always"])) as plan:
        with DirtyingGuest("memfd", 20) as d:
            time.sleep(0.05)
            d.machine.pause()
            runs = d.log.collect()
            d.log.stop()
            d.machine.resume()
    assert runs, "the guest's writes were not logged"
    assert plan.calls["ioctl:KVM_SET_USER_MEMORY_REGION"] >= 3  # bind, log on, log off
    assert plan.calls["ioctl:KVM_SET_USER_MEMORY_REGION2"] == 0


def test_a_dirty_ring_without_acq_rel_uses_the_first_flavour():
    with active_plan(load_plan(["cap:DIRTY_LOG_RING_ACQ_REL:0@always"])):
        with DirtyingGuest("memfd", 20, ring=64 << 10) as d:
            time.sleep(0.05)
            d.machine.pause()
            runs = d.log.collect()
            d.machine.resume()
    assert runs and d.log.how.startswith("dirty ring")


def test_a_dirty_ring_on_a_host_without_one_is_a_one_line_error():
    p = subprocess.run(
        [sys.executable, "-m", "kvmkit", "run", "--dirty-ring", "--console", "none"]
        + ["--fault", "cap:DIRTY_LOG_RING_ACQ_REL:0@always"]
        + ["--fault", "cap:DIRTY_LOG_RING:0@always"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 1
    assert "KVM_ENABLE_CAP failed" in p.stderr and "no KVM_CAP_DIRTY_LOG_RING" in p.stderr
    assert "Traceback" not in p.stderr


def test_guest_memfd_flags_kvmkit_does_not_know_are_reported():
    with (
        active_plan(load_plan(["cap:GUEST_MEMFD_FLAGS:0x103@always"])),
        build_for_boot(hello()) as m,
    ):
        assert m.memory.backend_name == "guest_memfd"
        notes = m.memory.notes
    assert "this kernel offers guest_memfd flags kvmkit does not know: 0x100" in notes
