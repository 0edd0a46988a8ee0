"""A host tap device, opened for a virtio-net backend.

`Tap.open("tap0")` attaches to an existing tap interface of the calling thread's
network namespace: /dev/net/tun, TUNSETIFF with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
TUNSETVNETHDRSZ 12 (the virtio 1.x `virtio_net_hdr_v1`: flags, gso_type, hdr_len,
gso_size, csum_start, csum_offset, num_buffers), the fd non-blocking. Every frame read
or written starts with that 12-byte header. `set_offload(TUN_F_...)` tells the tap
which offloads the guest accepts (TUNSETOFFLOAD), so it only hands over frames the
guest can take.

kvmkit does not create taps: a name that is not a tap of this namespace is refused
with the command that makes one. Errors are one line naming the tap and the fix.
"""

import errno
import fcntl
import os
import socket
import struct

from kvmkit.errors import ConfigError, KvmkitError
from kvmkit.faults import inject

TUN_PATH = "/dev/net/tun"
TUNSETIFF = 0x400454CA  # _IOW('T', 202, int)
TUNSETOFFLOAD = 0x400454D0  # _IOW('T', 208, unsigned int)
TUNGETIFF = 0x800454D2  # _IOR('T', 210, unsigned int)
TUNSETVNETHDRSZ = 0x400454D8  # _IOW('T', 216, int)
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFNAMSIZ = 16
IFREQ_BYTES = 40

# TUNSETOFFLOAD bits: what the reader of the tap (the guest) can take.
TUN_F_CSUM = 0x01  # partial checksums
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
TUN_F_UFO = 0x10

VNET_HDR_BYTES = 12  # struct virtio_net_hdr_v1 (with num_buffers)
MAX_FRAME_BYTES = 65550  # a 64 KiB GSO frame and its Ethernet header
READ_BYTES = VNET_HDR_BYTES + MAX_FRAME_BYTES


def _ifreq(name: str, flags: int) -> bytearray:
    buf = bytearray(IFREQ_BYTES)
    encoded = name.encode()
    buf[: len(encoded)] = encoded
    struct.pack_into("<H", buf, IFNAMSIZ, flags)
    return buf


class TapError(KvmkitError):
    """The tap failed while in use (it was deleted, or the host refused a frame)."""


class Tap:
    """An attached tap: `fd` (non-blocking), `read_frame()`, `write_frame()`."""

    def __init__(self, name: str, fd: int) -> None:
        self.name = name
        self.fd = fd
        self.offload = 0

    @classmethod
    def open(cls, name: str) -> "Tap":
        """Attach to tap `name` of this thread's network namespace."""
        if not 0 < len(name.encode()) < IFNAMSIZ or "/" in name:
            raise ConfigError(
                f"tap {name[:40]!r}: a tap name is 1 to {IFNAMSIZ - 1} characters without '/'"
            )
        create = f"create it with `ip tuntap add {name} mode tap && ip link set {name} up`"
        try:
            socket.if_nametoindex(name)
        except OSError:
            raise ConfigError(f"tap {name}: no such network interface: {create}") from None
        try:
            fd = os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ConfigError(
                f"tap {name}: {TUN_PATH} does not exist: load the tun module (modprobe tun)"
            ) from None
        except PermissionError:
            raise ConfigError(
                f"tap {name}: no permission to open {TUN_PATH}: run kvmkit as root or give it"
                " CAP_NET_ADMIN"
            ) from None
        try:
            fcntl.ioctl(fd, TUNSETIFF, _ifreq(name, IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
            fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("<i", VNET_HDR_BYTES))
            fcntl.ioctl(fd, TUNSETOFFLOAD, 0)
        except OSError as e:
            os.close(fd)
            raise ConfigError(_attach_error(name, e, create)) from None
        return cls(name, fd)

    def set_offload(self, flags: int) -> None:
        """Let the tap hand over frames with these offloads (TUN_F_* bits)."""
        try:
            fcntl.ioctl(self.fd, TUNSETOFFLOAD, flags)
        except OSError as e:
            raise TapError(
                f"tap {self.name}: the host refused offloads {flags:#x} (TUNSETOFFLOAD:"
                f" {os.strerror(e.errno or 0)})"
            ) from None
        self.offload = flags

    def read_frame(self, size: int = READ_BYTES) -> bytes | None:
        """One frame with its vnet header; None when none is waiting. TapError when the
        tap is gone."""
        try:
            inject("tap.read")
            return os.read(self.fd, size)
        except BlockingIOError:
            return None
        except OSError as e:
            raise TapError(f"tap {self.name}: read failed: {_why(e)}") from None

    def write_frame(self, buffers: list[bytes | memoryview]) -> bool:
        """Send one frame (vnet header first); False when the tap is full or down (the
        frame is dropped, as a NIC would), TapError when the tap is gone. Fault sites
        `tap.read` and `tap.write` fail these calls on purpose."""
        try:
            inject("tap.write")
            os.writev(self.fd, buffers)
            return True
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as e:
            if e.errno in (errno.EIO, errno.ENOBUFS, errno.ENOMEM):  # down, or no room
                return False
            raise TapError(f"tap {self.name}: write failed: {_why(e)}") from None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _why(e: OSError) -> str:
    if e.errno == errno.EBADFD:
        return "the interface was deleted"
    return os.strerror(e.errno or 0)


def _attach_error(name: str, e: OSError, create: str) -> str:
    if e.errno == errno.EBUSY:
        return f"tap {name} is already in use by another process (close it or use another tap)"
    if e.errno == errno.EPERM:
        return (
            f"tap {name}: not allowed to attach (the tap belongs to another user: create it"
            f" with `ip tuntap add {name} mode tap user $USER`, or run as root)"
        )
    if e.errno == errno.EINVAL:
        return (
            f"tap {name} is not a single-queue tap device (a tun, a multi-queue tap or another"
            f" kind of interface): {create}"
        )
    return f"tap {name}: attaching failed: {os.strerror(e.errno or 0)}"
