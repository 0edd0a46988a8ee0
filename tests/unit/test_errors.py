import errno

from kvmkit.kvm.errors import KvmError, open_hint


def test_kvm_error_carries_name_errno_and_hint():
    e = KvmError("KVM_SET_USER_MEMORY_REGION2", errno.EEXIST)
    assert e.ioctl == "KVM_SET_USER_MEMORY_REGION2" and e.errno == errno.EEXIST
    assert "overlaps an existing memory slot" in str(e)
    assert str(e).startswith("KVM_SET_USER_MEMORY_REGION2 failed: EEXIST")


def test_enotty_hint_names_the_ioctl():
    assert "does not implement KVM_FOO" in str(KvmError("KVM_FOO", errno.ENOTTY))


def test_open_hints_are_actionable():
    assert "kvm group" in open_hint("/dev/kvm", errno.EACCES)
    assert "modprobe" in open_hint("/dev/kvm", errno.ENOENT)
