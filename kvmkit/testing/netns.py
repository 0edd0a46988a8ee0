"""Network namespaces and taps for tests: a guest's tap and its peer, away from the
host's own network.

    with NetLab.create() as lab:            # netns kvk-<pid>-<n> with tap kvk<pid>t<n> in it
        with lab.entered():                 # this thread in the namespace: open the tap here
            machine = build_for_boot(resources_with_net(lab.tap))
        lab.run(["python3", "peer.py"])     # a peer process in the namespace
    # the namespace, and with it the tap, is deleted

The tap has `HOST_IP`/24 in the namespace; the guest takes `GUEST_IP`. Only `ip` (from
iproute2) and root are needed; `NetLab.unavailable()` says why a test must skip.
"""

import contextlib
import ctypes
import itertools
import os
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from kvmkit.closing import Closeable
from kvmkit.errors import KvmkitError

CLONE_NEWNET = 0x40000000
HOST_IP = "10.77.0.1"
GUEST_IP = "10.77.0.2"
HOST_MAC = "0a:00:00:00:00:01"  # every lab's tap: a guest moved between labs finds its peer
PREFIX = 24
_count = itertools.count()
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise KvmkitError(f"ip {' '.join(args)}: {result.stderr.strip()}")


@dataclass
class NetLab(Closeable):
    """A network namespace holding a tap (up, with HOST_IP) for one test."""

    netns: str
    tap: str

    @staticmethod
    def unavailable() -> str | None:
        """Why taps and namespaces cannot be made here (None: they can)."""
        if shutil.which("ip") is None:
            return "needs `ip` (iproute2) to create network namespaces"
        if os.geteuid() != 0:
            return "needs root to create network namespaces and taps"
        if not os.path.exists("/dev/net/tun"):
            return "needs /dev/net/tun (modprobe tun)"
        return None

    @classmethod
    def create(cls) -> "NetLab":
        n = next(_count)
        lab = cls(f"kvk-{os.getpid()}-{n}", f"kvk{os.getpid() % 100000}t{n}")
        _ip("netns", "add", lab.netns)
        try:
            lab.ip("tuntap", "add", lab.tap, "mode", "tap")
            lab.quiet_ipv6()
            lab.ip("link", "set", lab.tap, "address", HOST_MAC)
            lab.ip("addr", "add", f"{HOST_IP}/{PREFIX}", "dev", lab.tap)
            lab.ip("link", "set", lab.tap, "up")
            lab.ip("link", "set", "lo", "up")
        except BaseException:
            lab.close()
            raise
        return lab

    def quiet_ipv6(self) -> None:
        """No IPv6 on the tap: the host sends no neighbour discovery of its own, so the
        only frames are the test's."""
        subprocess.run(
            self.command(["sysctl", "-qw", f"net.ipv6.conf.{self.tap}.disable_ipv6=1"]),
            capture_output=True,
            timeout=30,
        )

    def ip(self, *args: str) -> None:
        _ip("-n", self.netns, *args)

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        """This thread inside the namespace for the block (a tap opened there stays
        attached after); threads started meanwhile stay inside."""
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            there = os.open(f"/run/netns/{self.netns}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                _setns(there)
            finally:
                os.close(there)
            try:
                yield
            finally:
                _setns(home)
        finally:
            os.close(home)

    def command(self, argv: Sequence[str]) -> list[str]:
        """`argv` run inside the namespace."""
        return ["ip", "netns", "exec", self.netns, *argv]

    def popen(self, argv: Sequence[str], **options: object) -> subprocess.Popen[bytes]:
        return subprocess.Popen(self.command(argv), **options)  # type: ignore[call-overload]

    def close(self) -> None:
        """Delete the namespace (the tap goes with it)."""
        with contextlib.suppress(KvmkitError):
            _ip("netns", "del", self.netns)
