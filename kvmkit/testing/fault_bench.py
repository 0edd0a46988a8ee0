"""The faults test bench: guest-visible events reach a guest's handlers, transient
KVM_RUN errors are retried, and a failed ioctl or memory operation while building a
machine is reported by name and leaves no fd behind.
"""

import errno
import os

from kvmkit.errors import KvmkitError
from kvmkit.faults import FaultPlan, FaultRule, active_plan
from kvmkit.kvm import KvmError
from kvmkit.testing.checks import Check
from kvmkit.testing.harness import built_machine, run_guest

# The trap guest's 25th KVM_RUN falls in its POST loop, after its IDT is loaded.
TRAP_AT = 25


def _delivered(what: str) -> str:
    run = run_guest("trap", memory="16M", arg=10, faults=[f"ioctl:KVM_RUN:{what}@nth={TRAP_AT}"])
    if run.status != 0:
        return run.reason
    handled = [line.removeprefix("trap: ") for line in run.lines if line.startswith("trap: vector")]
    return "; ".join(handled) or "no event handled"


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _refused(rule: FaultRule, name: str) -> str:
    """Build a machine with `rule` active: refused, naming `name`, with no fd left?"""
    before = _open_fds()
    plan = FaultPlan([rule])
    try:
        with active_plan(plan), built_machine("hello", memory="16M"):
            pass
        return "built anyway"
    except (KvmError, KvmkitError) as e:
        message = str(e)
    left = _open_fds() - before
    if left:
        return f"{left} fd(s) left open"
    return "refused cleanly" if name in message else f"refused: {message}"


def transient_run_errors() -> str:
    run = run_guest(
        "counter", memory="16M", arg=5, faults=["ioctl:KVM_RUN:EINTR@every=3"], timeout_s=20
    )
    return "guest completed" if run.status == 0 and len(run.injected) > 3 else run.reason


CHECKS: list[Check] = [
    Check(
        "event.gp",
        "#GP with error code 0x18",
        "vector 13 error 0x18 info 0x0",
        lambda: _delivered("#GP=0x18"),
    ),
    Check("event.ud", "#UD", "vector 6 error 0x0 info 0x0", lambda: _delivered("#UD")),
    Check(
        "event.pf",
        "#PF at 0xdead000, error code 2: CR2 holds the address",
        "vector 14 error 0x2 info 0xdead000",
        lambda: _delivered("#PF=0xdead000/2"),
    ),
    Check(
        "event.nmi", "NMI through KVM_NMI", "vector 2 error 0x0 info 0x0", lambda: _delivered("NMI")
    ),
    Check(
        "event.mce",
        "machine check through KVM_X86_SET_MCE: MC0_ADDR holds the address",
        "vector 18 error 0x0 info 0x123000",
        lambda: _delivered("MCE=0x123000"),
    ),
    Check(
        "run.eintr",
        "EINTR from every 3rd KVM_RUN is retried",
        "guest completed",
        transient_run_errors,
    ),
    Check(
        "build.create_vcpu",
        "ENOMEM from KVM_CREATE_VCPU: named, nothing left open",
        "refused cleanly",
        lambda: _refused(FaultRule("ioctl:KVM_CREATE_VCPU", errno.ENOMEM), "KVM_CREATE_VCPU"),
    ),
    Check(
        "build.memory_region",
        "EFAULT from KVM_SET_USER_MEMORY_REGION2: named, nothing left open",
        "refused cleanly",
        lambda: _refused(
            FaultRule("ioctl:KVM_SET_USER_MEMORY_REGION2", errno.EFAULT),
            "KVM_SET_USER_MEMORY_REGION2",
        ),
    ),
    Check(
        "build.memory_mmap",
        "ENOMEM mapping guest memory: named, nothing left open",
        "refused cleanly",
        lambda: _refused(FaultRule("memory.mmap", errno.ENOMEM), "cannot map"),
    ),
]
