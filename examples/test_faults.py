"""A fault-injection test: a #PF delivered while the guest runs reaches the trap
guest's handler with CR2 set, and EINTR from KVM_RUN is retried invisibly."""


def test_a_page_fault_reaches_the_guest_handler(run_guest):
    run = run_guest("trap", arg=10, faults=["ioctl:KVM_RUN:#PF=0xdead000/2@nth=25"])
    assert run.status == 0, run.reason
    assert "trap: vector 14 error 0x2 info 0xdead000" in run.lines
    assert run.injected == ["ioctl:KVM_RUN call 25: #PF at 0xdead000 (error code 0x2)"]


def test_interrupted_runs_are_retried(run_guest, fault_plan):
    plan = fault_plan("ioctl:KVM_RUN:EINTR@every=3")
    run = run_guest("counter", arg=5)
    assert run.status == 0, run.reason
    assert run.lines[-1].startswith("cpu0 n=5 ")
    assert len(plan.log) > 10
