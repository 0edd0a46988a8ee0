"""Fault rules: parsing, refusals that point at the bad part, and when they fire."""

import errno

import pytest

from kvmkit.errors import ConfigError
from kvmkit.faults import FaultPlan, load_plan, parse_rule


@pytest.mark.parametrize(
    ("text", "site", "err"),
    [
        ("ioctl:KVM_RUN:EINTR@every=100", "ioctl:KVM_RUN", errno.EINTR),
        ("ioctl:KVM_CREATE_VCPU:ENOMEM@once", "ioctl:KVM_CREATE_VCPU", errno.ENOMEM),
        ("snapshot.write:EIO@nth=3", "snapshot.write", errno.EIO),
        ("ioctl:KVM_SET_REGS:EFAULT@p=0.05,seed=7", "ioctl:KVM_SET_REGS", errno.EFAULT),
    ],
)
def test_rules_from_the_issue_parse(text, site, err):
    rule = parse_rule(text)
    assert (rule.site, rule.errno, rule.text) == (site, err, text)


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("ioctl:KVM_RUN:EINTR", "is not WHERE:WHAT@WHEN"),
        ("ioctl:KVM_RUNN:EINTR@once", "unknown site 'ioctl:KVM_RUNN'"),
        ("ioctl:KVM_RUN:EWHAT@once", "'EWHAT' is not an errno name"),
        ("ioctl:KVM_RUN:EINTR@often", "'often' is not once, always"),
        ("ioctl:KVM_RUN:EINTR@nth=x", "invalid literal"),
        ("ioctl:KVM_RUN:EINTR@p=2", "0 <= p <= 1"),
        ("cap:GUEST_MEMFDD:0@always", "unknown site 'cap:GUEST_MEMFDD'"),
        ("cap:GUEST_MEMFD:none@always", "a number (e.g. cap:GUEST_MEMFD:0@always)"),
        ("snapshot.write:corrupt@once", "corrupt applies to migration.send, migration.recv"),
    ],
)
def test_malformed_rules_are_refused_pointing_at_them(text, complaint):
    with pytest.raises(ConfigError, match="fault rule") as e:
        parse_rule(text)
    assert complaint in str(e.value) and repr(text) in str(e.value)


def test_capability_rules_answer_for_the_host():
    from kvmkit.faults import active_plan, capability_answer

    rule = parse_rule("cap:GUEST_MEMFD_FLAGS:0x1@always")
    assert (rule.site, rule.action, rule.value, rule.describe()) == (
        "cap:GUEST_MEMFD_FLAGS",
        "answer",
        1,
        "answers 0x1",
    )
    with active_plan(FaultPlan([rule])):
        assert capability_answer("GUEST_MEMFD_FLAGS", 3) == 1
        assert capability_answer("GUEST_MEMFD", 1) == 1  # other capabilities: the host's
    assert capability_answer("GUEST_MEMFD_FLAGS", 3) == 3  # no plan: the host's


def fired(text, calls=20):
    plan = FaultPlan([parse_rule(text)])
    return [n for n in range(1, calls + 1) if plan.planned(plan.rules[0].site)]


def test_when_semantics():
    assert fired("ioctl:KVM_RUN:EINTR@once") == [1]
    assert fired("ioctl:KVM_RUN:EINTR@nth=3") == [3]
    assert fired("ioctl:KVM_RUN:EINTR@always", 5) == [1, 2, 3, 4, 5]
    assert fired("ioctl:KVM_RUN:EINTR@every=6") == [6, 12, 18]
    a = fired("ioctl:KVM_RUN:EINTR@p=0.3,seed=7", 200)
    assert a == fired("ioctl:KVM_RUN:EINTR@p=0.3,seed=7", 200) and 30 < len(a) < 90


def test_toml_plan_and_summary(tmp_path):
    path = tmp_path / "plan.toml"
    path.write_text('[[fault]]\nrule = "ioctl:KVM_RUN:EINTR@every=2"\n')
    plan = load_plan(["snapshot.read:EIO@once"], str(path))
    for _ in range(4):
        plan.planned("ioctl:KVM_RUN")
    assert plan.summary()[1] == (
        "ioctl:KVM_RUN:EINTR@every=2: injected 2 time(s) of 4 call(s) (calls 2, 4)"
    )
    path.write_text("[[fault]]\nwhere = 1\n")
    with pytest.raises(ConfigError, match=r'\[\[fault\]\] 1 needs rule = "..."'):
        load_plan([], str(path))


@pytest.mark.parametrize(
    ("text", "action", "detail"),
    [
        ("ioctl:KVM_RUN:delay=5ms@every=10", "delay", 0.005),
        ("snapshot.read:delay=0.5s@once", "delay", 0.5),
        ("snapshot.write:short@nth=2", "short", None),
        ("migration.send:disconnect@nth=3,after=migration.precopy", "disconnect", None),
        ("memory.punch:EIO@once", "errno", None),
        ("device.io:EIO@nth=4", "errno", None),
    ],
)
def test_other_actions_parse(text, action, detail):
    rule = parse_rule(text)
    assert rule.action == action
    if detail is not None:
        assert rule.delay_s == detail


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("ioctl:KVM_RUN:short@once", "short applies to"),
        ("snapshot.write:disconnect@once", "disconnect applies to migration.send"),
        ("snapshot.write:EIO@after=precopy", "unknown phase 'precopy'"),
        ("memory.mmapp:EIO@once", "one of snapshot.write"),
    ],
)
def test_actions_a_site_cannot_take_are_refused(text, complaint):
    with pytest.raises(ConfigError) as e:
        parse_rule(text)
    assert complaint in str(e.value)


def test_after_phase_counts_only_calls_once_the_phase_began():
    plan = FaultPlan([parse_rule("snapshot.write:EIO@nth=2,after=snapshot")])
    assert [plan.planned("snapshot.write") for _ in range(3)] == [0, 0, 0]
    plan.enter("snapshot")
    assert [plan.planned("snapshot.write") for _ in range(3)] == [0, errno.EIO, 0]
    assert [i.call for i in plan.log] == [5]


def test_every_rule_on_a_site_counts_each_call():
    plan = load_plan(["snapshot.write:EIO@nth=2", "snapshot.write:ENOSPC@nth=3"])
    assert [plan.planned("snapshot.write") for _ in range(4)] == [0, errno.EIO, errno.ENOSPC, 0]


def test_hooks_raise_delay_and_shorten():
    from kvmkit.faults import active_plan, inject

    plan = load_plan(
        [
            "snapshot.write:short@nth=1",
            "snapshot.write:EIO@nth=2",
            "migration.send:disconnect@once",
            "snapshot.read:delay=20ms@once",
        ]
    )
    with active_plan(plan):
        assert inject("snapshot.write") == "short"
        with pytest.raises(OSError, match="fault injected at snapshot.write"):
            inject("snapshot.write")
        with pytest.raises(ConnectionResetError):
            inject("migration.send")
        import time

        start = time.monotonic()
        assert inject("snapshot.read") == ""
        assert time.monotonic() - start >= 0.02
    assert inject("snapshot.write") == ""  # no plan active: nothing happens
