"""One migration connection. Source to target: the section stream (the snapshot
format). Target to source, and the source's final go: one JSON object per line.
Counts bytes, limits bandwidth, and holds the migration.send/recv hook points."""

import json
import socket
import time
from typing import Any

from kvmkit.errors import KvmkitError
from kvmkit.faults import inject

PIECE_BYTES = 1 << 20
MAX_MESSAGE_BYTES = 1 << 16
BURST_S = 0.05  # the bandwidth cap holds over any window longer than this


class ChannelClosed(KvmkitError):
    """The other side closed the connection or it broke."""


class Channel:
    def __init__(self, sock: socket.socket, bandwidth_bps: int = 0) -> None:
        self.sock = sock
        self.bandwidth_bps = bandwidth_bps
        self.sent = 0
        self.received = 0
        self._due = time.monotonic()  # when the bytes sent so far may all be out

    # -- the section stream (StreamWriter sink / StreamReader source) ------------------
    def write(self, data: bytes | memoryview) -> int:
        view = memoryview(data).cast("B")
        for at in range(0, len(view), PIECE_BYTES):
            piece = view[at : at + PIECE_BYTES]
            change = self._hook("migration.send", "sending")
            if change == "corrupt":
                damaged = bytearray(piece)
                damaged[len(damaged) // 2] ^= 0x01
                piece = memoryview(damaged)
            elif change == "short":
                self._send(piece[: max(1, len(piece) // 2)])
                piece = piece[max(1, len(piece) // 2) :]
            self._send(piece)
        return len(view)

    def _send(self, piece: memoryview) -> None:
        try:
            self.sock.sendall(piece)
        except OSError as e:
            raise ChannelClosed(f"the connection broke while sending: {e.strerror or e}") from None
        self.sent += len(piece)
        if self.bandwidth_bps:
            self._pace(len(piece))

    def _pace(self, n: int) -> None:
        """A cap, not an average: idle time earns at most BURST_S of sending ahead, so a
        slow first pass cannot be made up by bursting later."""
        now = time.monotonic()
        self._due = max(self._due, now - BURST_S) + n / self.bandwidth_bps
        wait = self._due - now
        if wait > 0:
            time.sleep(wait)

    def readinto(self, buffer: memoryview) -> int:
        change = self._hook("migration.recv", "receiving")
        if change == "short":
            buffer = buffer[: max(1, len(buffer) // 2)]
        try:
            n = self.sock.recv_into(buffer)
        except OSError as e:
            raise ChannelClosed(
                f"the connection broke while receiving: {e.strerror or e}"
            ) from None
        if change == "corrupt" and n:
            buffer[n // 2] ^= 0x01  # as if the bit flipped on the way
        self.received += n
        return n

    @staticmethod
    def _hook(site: str, doing: str) -> str:
        """The fault hook of `site`: an injected failure is a broken connection."""
        try:
            return inject(site)
        except OSError as e:
            raise ChannelClosed(
                f"the connection broke while {doing}: {e.strerror or e} ({e.filename})"
            ) from None

    # -- control messages ------------------------------------------------------------
    def send_message(self, message: dict[str, Any]) -> None:
        self._hook("migration.send", "sending")
        try:
            self.sock.sendall(json.dumps(message).encode() + b"\n")
        except OSError as e:
            raise ChannelClosed(f"the connection broke while sending: {e.strerror or e}") from None

    def recv_message(self, timeout_s: float | None = None) -> dict[str, Any]:
        """The next JSON line; ChannelClosed if the peer went away or said nothing for
        `timeout_s`."""
        self._hook("migration.recv", "receiving")
        line = bytearray()
        self.sock.settimeout(timeout_s)
        try:
            while not line.endswith(b"\n"):
                byte = self.sock.recv(1)
                if not byte:
                    raise ChannelClosed("the other side closed the connection")
                line += byte
                if len(line) > MAX_MESSAGE_BYTES:
                    raise ChannelClosed("a control message was too long")
        except TimeoutError:
            raise ChannelClosed(f"no answer within {timeout_s:g} s") from None
        except OSError as e:
            raise ChannelClosed(f"the connection broke: {e.strerror or e}") from None
        finally:
            self.sock.settimeout(None)
        try:
            message = json.loads(line)
        except ValueError:
            raise ChannelClosed(f"not a control message: {bytes(line[:80])!r}") from None
        if not isinstance(message, dict):
            raise ChannelClosed("a control message is a JSON object")
        return message

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
