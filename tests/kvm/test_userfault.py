"""userfaultfd as lazy restore drives it, on a memfd mapping: a fault is reported with
its address and filled by a copy; a second fill of a present page reports EEXIST as
False, for copies and zero pages; waiting with nothing pending returns nothing."""

import ctypes
import os
import threading

import pytest

from kvmkit import libc
from kvmkit.memory.userfault import UserfaultError, Userfaultfd

PAGE = 4096


@pytest.fixture
def uffd_mapping():
    try:
        uffd = Userfaultfd()
    except UserfaultError as e:
        pytest.skip(str(e))
    fd = os.memfd_create("kvmkit-uffd-test")
    os.ftruncate(fd, 4 * PAGE)
    addr = libc.mmap(4 * PAGE, libc.PROT_READ | libc.PROT_WRITE, libc.MAP_SHARED, fd)
    uffd.register(addr, 4 * PAGE)
    yield uffd, addr
    uffd.unregister(addr, 4 * PAGE)
    uffd.close()
    uffd.close()  # twice: harmless
    libc.munmap(addr, 4 * PAGE)
    os.close(fd)


def test_a_fault_is_reported_and_filled_by_a_copy(uffd_mapping):
    """The faulting read is the kernel's (a write(2) from the page), made without the
    GIL, as KVM's accesses to guest memory are."""
    uffd, addr = uffd_mapping
    page = memoryview((ctypes.c_char * PAGE).from_address(addr)).cast("B")
    r, w = os.pipe()
    reader = threading.Thread(target=lambda: os.write(w, page[:16]))
    reader.start()
    faults = uffd.wait_faults(5.0)
    assert faults == [addr]
    source = ctypes.create_string_buffer(b"\x7e" * PAGE, PAGE)
    assert uffd.copy(addr, ctypes.addressof(source), PAGE) is True
    reader.join(5)
    assert os.read(r, 16) == b"\x7e" * 16
    os.close(r)
    os.close(w)
    page.release()
    assert uffd.copy(addr, ctypes.addressof(source), PAGE) is False  # already there
    assert uffd.wait_faults(0.01) == []


def test_zero_pages_and_wakes(uffd_mapping):
    uffd, addr = uffd_mapping
    assert uffd.zeropage(addr + PAGE, PAGE) is True
    assert uffd.zeropage(addr + PAGE, PAGE) is False  # present now: EEXIST
    uffd.wake(addr, 4 * PAGE)  # nobody waiting: nothing happens
