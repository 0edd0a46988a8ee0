"""Guest-visible faults: each event the plan can deliver reaches the `trap` guest's
handler, with its vector, error code and address, and the guest then finishes."""

import pytest

from kvmkit.errors import ConfigError
from kvmkit.faults import FaultPlan, GuestEvent, parse_rule
from kvmkit.kvm.guest_events import deliver

# The trap guest prints "trap: handlers ready" (21 console exits), then makes 10 POST
# exits: KVM_RUN call 25 lands in that loop, after the IDT is loaded.
AT = 25


@pytest.mark.parametrize(
    ("what", "line"),
    [
        ("#GP=0x18", "trap: vector 13 error 0x18 info 0x0"),
        ("#GP", "trap: vector 13 error 0x0 info 0x0"),
        ("#UD", "trap: vector 6 error 0x0 info 0x0"),
        ("#PF=0xdead000/2", "trap: vector 14 error 0x2 info 0xdead000"),
        ("NMI", "trap: vector 2 error 0x0 info 0x0"),
        ("MCE=0x123000", "trap: vector 18 error 0x0 info 0x123000"),
    ],
)
def test_each_event_reaches_the_guest_handler(run_guest, what, line):
    run = run_guest("trap", arg=10, faults=[f"ioctl:KVM_RUN:{what}@nth={AT}"])
    assert run.status == 0, run.reason
    assert run.lines == ["trap: handlers ready", line, "trap: 1 event(s)"]
    assert run.injected == [
        f"ioctl:KVM_RUN call {AT}: {parse_rule(f'ioctl:KVM_RUN:{what}@once').describe()}"
    ]


def test_events_every_nth_entry_are_each_handled_once(run_guest):
    # A handler prints 34 characters (34 exits), so every 50th entry leaves it room.
    run = run_guest("trap", arg=100, faults=["ioctl:KVM_RUN:#UD@every=50"], timeout_s=20)
    assert run.status == 0, run.reason
    # An event can land inside the last line, so count the handler's text anywhere.
    assert run.console.count("trap: vector 6 error 0x0 info 0x0\n") == len(run.injected) >= 3


def test_a_machine_check_inside_the_handler_shuts_the_guest_down(run_guest):
    """As on hardware: a second #MC while MCG_STATUS.MCIP is set is a shutdown."""
    run = run_guest(
        "trap", arg=10, faults=[f"ioctl:KVM_RUN:MCE@nth={AT}", f"ioctl:KVM_RUN:MCE@nth={AT + 2}"]
    )
    assert run.status == 3 and "triple fault" in run.reason


def test_an_exception_without_a_handler_is_a_triple_fault(run_guest):
    """The counter guest installs no IDT: the injected #GP cannot be delivered."""
    run = run_guest("counter", arg=3, faults=["ioctl:KVM_RUN:#GP@nth=5"])
    assert run.status == 3 and "triple fault" in run.reason


def test_deliver_directly_from_python(vm_factory):
    machine = vm_factory("trap", arg=2)
    vcpu = machine.vcpus[0]
    deliver(vcpu, GuestEvent("UD"))
    events = vcpu.get_vcpu_events()
    assert (events.exception.injected, events.exception.nr) == (1, 6)


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("ioctl:KVM_RUN:#PF@once", "#PF needs the faulting address"),
        ("ioctl:KVM_RUN:#PF=zz@once", "'zz' is not a number"),
        ("ioctl:KVM_RUN:#UD=3@once", "write #GP[=ERR], #UD"),
        ("ioctl:KVM_CREATE_VCPU:#GP@once", "guest events are delivered before a KVM_RUN"),
    ],
)
def test_bad_event_rules_are_refused(text, complaint):
    with pytest.raises(ConfigError, match="fault rule") as e:
        FaultPlan([parse_rule(text)])
    assert complaint in str(e.value)
