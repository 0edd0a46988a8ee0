"""uAPI wrappers a running machine does not reach on its own, each against the real
KVM: an ioeventfd with datamatch handles the guest's port write in the kernel, MSR
reads and writes KVM refuses are named by index, hardware breakpoints stop the guest
where they are set, dirty rings are sized against the host's limit, and closing twice
is harmless."""

import os

import pytest

from kvmkit.kvm import Kvm, KvmError
from kvmkit.machine.result import EXIT_GUEST_CRASH
from kvmkit.uapi.cpu import KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_USE_HW_BP
from kvmkit.uapi.exits import ExitReason

PORT = 0x90  # claimed by no kvmkit device: an exit for it would crash the run


def test_an_ioeventfd_with_datamatch_takes_the_write_in_the_kernel(guest_asm, vm_factory):
    guest = guest_asm(f"mov al, 0x42\n out {PORT}, al\n out {PORT}, al\n mov edi, 0\n jmp exit\n")
    machine = vm_factory(guest, memory="16M")
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        machine.vm.ioeventfd(efd, PORT, 1, pio=True, datamatch=0x42)
        result = machine.run()
        assert result.status == 0, result.reason  # no exit reached kvmkit for PORT
        assert os.eventfd_read(efd) == 2
        machine.vm.ioeventfd(efd, PORT, 1, pio=True, datamatch=0x42, deassign=True)
    finally:
        os.close(efd)


def test_a_non_matching_write_still_exits_to_the_vmm(guest_asm, vm_factory):
    guest = guest_asm(f"mov al, 0x41\n out {PORT}, al\n jmp park\n")
    machine = vm_factory(guest, memory="16M")
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        machine.vm.ioeventfd(efd, PORT, 1, pio=True, datamatch=0x42)
        result = machine.run()
        assert result.status == EXIT_GUEST_CRASH
        assert f"port {PORT:#x}, which no device claims" in result.reason
        with pytest.raises(BlockingIOError):
            os.eventfd_read(efd)
    finally:
        os.close(efd)


def test_refused_msrs_are_named(vm_factory):
    vcpu = vm_factory("hello", memory="16M").vcpus[0]
    with pytest.raises(KvmError, match="MSR 0xdeadbeef is not readable"):
        vcpu.get_msrs([0x10, 0xDEADBEEF])
    with pytest.raises(KvmError, match="MSR 0xdeadbeef was refused"):
        vcpu.set_msrs({0xDEADBEEF: 1})


def test_a_hardware_breakpoint_stops_the_guest_where_it_is_set(vm_factory):
    machine = vm_factory("hello", memory="16M")
    entry = machine.plan.entry
    dr7 = 0x401  # L0: breakpoint 0 on instruction execution
    machine.vcpus[0].set_guest_debug(
        KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP, [entry, 0, 0, 0, 0, 0, 0, dr7]
    )
    result = machine.run()
    assert result.status == EXIT_GUEST_CRASH
    assert result.reason == f"vCPU 0: unhandled exit reason DEBUG ({int(ExitReason.DEBUG)})"
    assert f"rip={entry:016x}" in result.detail


def test_a_kicked_vcpu_leaves_kvm_run_at_once(vm_factory):
    vcpu = vm_factory("hello", memory="16M").vcpus[0]
    vcpu.kick(None)  # immediate_exit, no signal: this thread would be the one to enter
    assert vcpu.run() == ExitReason.INTR
    vcpu.run_struct.immediate_exit = 0


def test_dirty_rings_are_sized_against_the_host():
    with Kvm() as kvm, kvm.create_vm() as vm:
        most = vm.check_extension("DIRTY_LOG_RING_ACQ_REL") or vm.check_extension("DIRTY_LOG_RING")
        if not most:
            pytest.skip("this host has no dirty ring")
        with pytest.raises(KvmError, match=f"above this host's {most}"):
            vm.enable_dirty_ring(most * 2)
        assert vm.enable_dirty_ring(4096).startswith("KVM_CAP_DIRTY_LOG_RING")
        vcpu = vm.create_vcpu(0)
        assert vcpu.dirty_ring is not None and len(vcpu.dirty_ring) == 4096 // 8


def test_closing_twice_is_harmless():
    kvm = Kvm()
    vm = kvm.create_vm()
    vcpu = vm.create_vcpu(0)
    vcpu.close()
    vcpu.close()
    vcpu.kick(None)  # a closed vCPU has no kvm_run to mark: nothing happens
    vm.close()
    vm.close()
    kvm.close()
    kvm.close()
    assert (vcpu.fd, vm.fd, kvm.fd) == (-1, -1, -1)
