"""userfaultfd in missing mode: the first touch of a registered page (by the guest
through KVM, or by kvmkit) waits until kvmkit supplies its contents."""

import ctypes
import errno
import os
import select

from kvmkit import libc
from kvmkit.errors import KvmkitError
from kvmkit.uapi.userfaultfd import (
    UFFD_API,
    UFFD_EVENT_PAGEFAULT,
    UFFDIO_API,
    UFFDIO_COPY,
    UFFDIO_REGISTER,
    UFFDIO_REGISTER_MODE_MISSING,
    UFFDIO_UNREGISTER,
    UFFDIO_WAKE,
    UFFDIO_ZEROPAGE,
    USERFAULTFD_IOC_NEW,
    SYS_userfaultfd,
    uffd_msg,
    uffdio_api,
    uffdio_copy,
    uffdio_range,
    uffdio_register,
    uffdio_zeropage,
)

_MSG_SIZE = ctypes.sizeof(uffd_msg)


class UserfaultError(KvmkitError):
    pass


def _ioctl(fd: int, request: int, arg: ctypes.Structure, what: str) -> None:
    if libc.raw_ioctl(fd, ctypes.c_ulong(request), ctypes.byref(arg)) < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


class Userfaultfd:
    """A userfaultfd (kernel faults included: KVM reaches guest pages through GUP)."""

    def __init__(self) -> None:
        fd = libc._syscall(SYS_userfaultfd, os.O_CLOEXEC | os.O_NONBLOCK)
        if fd < 0:
            fd = self._from_device(ctypes.get_errno())
        self.fd = int(fd)
        api = uffdio_api(api=UFFD_API)
        try:
            _ioctl(self.fd, UFFDIO_API, api, "UFFDIO_API")
        except OSError as e:
            os.close(self.fd)
            raise UserfaultError(f"userfaultfd API handshake failed: {e.strerror}") from None

    @staticmethod
    def _from_device(syscall_errno: int) -> int:
        try:
            dev = os.open("/dev/userfaultfd", os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise UserfaultError(
                "userfaultfd is not available: the syscall gave"
                f" {errno.errorcode.get(syscall_errno)} and /dev/userfaultfd {e.strerror};"
                " run as root or set"
                " vm.unprivileged_userfaultfd=1"
            ) from None
        try:
            fd = libc.raw_ioctl(
                dev, ctypes.c_ulong(USERFAULTFD_IOC_NEW), os.O_CLOEXEC | os.O_NONBLOCK
            )
            if fd < 0:
                raise UserfaultError(
                    f"/dev/userfaultfd refused a new fd: {os.strerror(ctypes.get_errno())}"
                )
            return int(fd)
        finally:
            os.close(dev)

    def register(self, addr: int, length: int) -> None:
        """Missing-mode registration of [addr, addr+length). Raises OSError (EINVAL
        where the mapping's file does not support it, e.g. guest_memfd on 6.18)."""
        reg = uffdio_register(uffdio_range(addr, length), UFFDIO_REGISTER_MODE_MISSING)
        _ioctl(self.fd, UFFDIO_REGISTER, reg, "UFFDIO_REGISTER")

    def unregister(self, addr: int, length: int) -> None:
        _ioctl(self.fd, UFFDIO_UNREGISTER, uffdio_range(addr, length), "UFFDIO_UNREGISTER")

    def copy(self, dst: int, src: int, length: int) -> bool:
        """Fill missing pages at dst from src and wake their waiters. False if some page
        was already present (EEXIST): the caller then wakes or retries per page."""
        request = uffdio_copy(dst=dst, src=src, len=length)
        try:
            _ioctl(self.fd, UFFDIO_COPY, request, "UFFDIO_COPY")
        except OSError as e:
            if e.errno == errno.EEXIST:
                return False
            raise
        return True

    def zeropage(self, dst: int, length: int) -> bool:
        request = uffdio_zeropage(uffdio_range(dst, length))
        try:
            _ioctl(self.fd, UFFDIO_ZEROPAGE, request, "UFFDIO_ZEROPAGE")
        except OSError as e:
            if e.errno == errno.EEXIST:
                return False
            raise
        return True

    def wake(self, addr: int, length: int) -> None:
        _ioctl(self.fd, UFFDIO_WAKE, uffdio_range(addr, length), "UFFDIO_WAKE")

    def wait_faults(self, timeout_s: float) -> list[int]:
        """Faulting addresses, waiting up to `timeout_s` for the first."""
        ready, _, _ = select.select([self.fd], [], [], timeout_s)
        if not ready:
            return []
        try:
            data = os.read(self.fd, _MSG_SIZE * 64)
        except BlockingIOError:
            return []
        out = []
        for at in range(0, len(data) - _MSG_SIZE + 1, _MSG_SIZE):
            msg = uffd_msg.from_buffer_copy(data, at)
            if msg.event == UFFD_EVENT_PAGEFAULT:
                out.append(msg.address)
        return out

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
