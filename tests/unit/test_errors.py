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


def test_every_open_failure_has_a_hint():
    assert open_hint("/dev/kvm", errno.ENXIO) == "/dev/kvm exists but no KVM backend is loaded"
    assert open_hint("/dev/kvm", errno.ENODEV) == "/dev/kvm exists but no KVM backend is loaded"
    assert "root" in open_hint("/dev/kvm", errno.EPERM)
    assert open_hint("/dev/kvm", errno.EIO) == ""  # nothing useful to add


def test_default_hints_for_common_errnos():
    assert "out of memory" in str(KvmError("KVM_CREATE_VCPU", errno.ENOMEM))
    assert "harvest the ring" in str(KvmError("KVM_GET_DIRTY_LOG", errno.ENXIO))
    assert "permission denied by the host kernel" in str(KvmError("KVM_RUN", errno.EPERM))
    assert str(KvmError("KVM_SET_REGS", errno.EIO)).endswith("(Input/output error)")


def test_backend_detection_without_any_kvm_module(tmp_path, monkeypatch):
    from kvmkit.kvm import system

    monkeypatch.setattr(system, "SYSFS_MODULES", str(tmp_path))
    assert system.kvm_backend() == "none"
    (tmp_path / "kvm_amd").mkdir()
    assert system.kvm_backend() == "kvm_amd"


def test_unknown_guest_memfd_flag_bits_are_shown_in_hex():
    from kvmkit.kvm.vm import describe_gmem_flags

    assert describe_gmem_flags(0x1 | 0x40) == "MMAP|0x40"
    assert describe_gmem_flags(0) == "none"
