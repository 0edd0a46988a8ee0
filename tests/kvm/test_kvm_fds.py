"""The fd classes against the real /dev/kvm."""

import errno
import os

import pytest

from kvmkit.kvm import Kvm, KvmError, KvmUnavailableError
from kvmkit.uapi.caps import Cap
from kvmkit.uapi.memory import GUEST_MEMFD_FLAG_NO_DIRECT_MAP

from .conftest import open_fds


def test_capabilities_by_name_number_and_enum(kvm):
    assert kvm.check_extension("KVM_CAP_USER_MEMORY2") == kvm.check_extension(Cap.USER_MEMORY2)
    assert kvm.check_extension("max_vcpus") == kvm.check_extension(66) >= 1
    assert "GUEST_MEMFD" in kvm.capabilities()
    with pytest.raises(ValueError, match="unknown KVM capability"):
        kvm.check_extension("NOT_A_CAP")


def test_system_queries(kvm):
    assert kvm.vcpu_mmap_size >= 4096 * 2
    cpuid = kvm.supported_cpuid()
    assert any(e.function == 0 for e in cpuid)
    assert 0x10 in kvm.msr_index_list()  # IA32_TSC


def test_missing_device_gives_a_hint():
    with pytest.raises(KvmUnavailableError, match="load a KVM module"):
        Kvm("/nonexistent/kvm")


def test_guest_memfd_einval_names_supported_flags(vm):
    supported = vm.guest_memfd_flags()
    if supported & GUEST_MEMFD_FLAG_NO_DIRECT_MAP:
        pytest.skip("this host supports NO_DIRECT_MAP")
    with pytest.raises(KvmError) as info:
        vm.create_guest_memfd(1 << 20, GUEST_MEMFD_FLAG_NO_DIRECT_MAP)
    assert info.value.ioctl == "KVM_CREATE_GUEST_MEMFD"
    assert info.value.errno == errno.EINVAL
    assert "this host supports" in str(info.value)


def test_guest_memfd_bad_size_hint(vm):
    with pytest.raises(KvmError, match="multiple of the page size"):
        vm.create_guest_memfd(4097, 0)


def test_vcpu_state_round_trips(vm):
    vcpu = vm.create_vcpu(0)
    regs = vcpu.get_regs()
    regs.rax, regs.rip = 0x1234, 0x5000
    vcpu.set_regs(regs)
    assert (vcpu.get_regs().rax, vcpu.get_regs().rip) == (0x1234, 0x5000)
    sregs = vcpu.get_sregs()
    vcpu.set_sregs(sregs)
    vcpu.set_fpu(vcpu.get_fpu())
    vcpu.set_vcpu_events(vcpu.get_vcpu_events())
    vcpu.set_debugregs(vcpu.get_debugregs())
    vcpu.set_xcrs(vcpu.get_xcrs())
    vcpu.set_xsave(vcpu.get_xsave())
    vcpu.set_msrs({0x10: 0})  # IA32_TSC
    assert 0x10 in vcpu.get_msrs([0x10])
    assert vcpu.get_mp_state() in (0, 1)


def test_closing_releases_every_fd():
    before = open_fds()
    with Kvm() as kvm, kvm.create_vm() as vm:
        vm.create_vcpu(0)
        vm.create_vcpu(1)
        assert len(open_fds() - before) >= 4
    assert open_fds() == before


def test_vcpu_fd_count_is_exact():
    before = open_fds()
    kvm = Kvm()
    vm = kvm.create_vm()
    vm.create_vcpu(0)
    assert len(open_fds() - before) == 3
    vm.close()
    kvm.close()
    assert open_fds() == before
    assert not os.path.exists(f"/proc/self/fd/{vm.fd}") or vm.fd == -1
