"""One virtio-vsock stream connection between the guest and a host unix socket.

The packet header (virtio 1.2, 5.10.6), 44 bytes little-endian: src_cid u64,
dst_cid u64, src_port u32, dst_port u32, len u32, type u16 (1: stream), op u16,
flags u32, buf_alloc u32, fwd_cnt u32.

Credit (5.10.6.3): each side says how much buffer it has for the stream (buf_alloc)
and how many bytes it has taken out of it so far (fwd_cnt, mod 2**32); a sender may
have at most `buf_alloc - (sent - fwd_cnt)` bytes in flight. kvmkit's side:

- guest to host: the connection buffers at most `BUF_BYTES` the host socket has not
  yet taken, and advertises exactly that; a guest that sends more than its credit is
  reset (RST), so a host peer that never reads costs at most `BUF_BYTES`. A credit
  update goes to the guest when the buffer empties or half of it was freed.
- host to guest: kvmkit reads the host socket only when the guest has credit and an
  rx buffer to put the bytes in, so a guest that never reads leaves the bytes in the
  host socket (its writer blocks), never in kvmkit.

States: `connecting` (kvmkit sent the guest a REQUEST for a host client),
`established`, then shutdown flags per direction; a connection ends with an RST to
the guest (either side gone, or both directions shut and the buffer flushed) or
with the guest's RST. A host socket that errors (the peer vanished) means RST; the fault
site `vsock.host` (e.g. `vsock.host:disconnect@once`) makes a send or receive fail so.
"""

import errno
import socket
import struct
from dataclasses import dataclass

from kvmkit.faults import inject

HEADER = struct.Struct("<QQIIIHHIII")
HEADER_BYTES = HEADER.size  # 44
TYPE_STREAM = 1
OP_REQUEST = 1
OP_RESPONSE = 2
OP_RST = 3
OP_SHUTDOWN = 4
OP_RW = 5
OP_CREDIT_UPDATE = 6
OP_CREDIT_REQUEST = 7
SHUTDOWN_RCV = 1
SHUTDOWN_SEND = 2
HOST_CID = 2
MAX_PAYLOAD_BYTES = 64 << 10  # Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE
BUF_BYTES = 256 << 10  # per connection, guest to host
U32 = 0xFFFF_FFFF


@dataclass(frozen=True)
class Header:
    src_cid: int
    dst_cid: int
    src_port: int
    dst_port: int
    len: int
    type: int
    op: int
    flags: int = 0
    buf_alloc: int = 0
    fwd_cnt: int = 0

    def pack(self) -> bytes:
        return HEADER.pack(
            self.src_cid,
            self.dst_cid,
            self.src_port,
            self.dst_port,
            self.len,
            self.type,
            self.op,
            self.flags,
            self.buf_alloc,
            self.fwd_cnt,
        )

    @classmethod
    def unpack(cls, data: bytes) -> "Header":
        return cls(*HEADER.unpack_from(data))


class Connection:
    """A stream between guest port `guest_port` and kvmkit's `host_port`, over the host
    socket `sock` (non-blocking). Not thread-safe: its owner serialises calls."""

    def __init__(
        self,
        sock: socket.socket,
        guest_cid: int,
        guest_port: int,
        host_port: int,
        *,
        connecting: bool,
        buf_bytes: int = BUF_BYTES,
    ) -> None:
        self.sock = sock
        self.guest_cid = guest_cid
        self.guest_port = guest_port
        self.host_port = host_port
        self.buf_bytes = buf_bytes
        self.state = "connecting" if connecting else "established"
        self.tx = bytearray()  # from the guest, not yet taken by the host socket
        self.fwd_cnt = 0  # bytes the host socket took (mod 2**32)
        self.sent_fwd_cnt = 0  # the fwd_cnt the guest last heard
        self.rx_cnt = 0  # bytes sent to the guest (mod 2**32)
        self.peer_buf_alloc = 0
        self.peer_fwd_cnt = 0
        self.guest_shut_send = False  # the guest will send no more
        self.guest_shut_rcv = False  # the guest will read no more
        self.host_eof = False  # the host socket's peer will send no more
        self.host_shut = False  # kvmkit shut the host socket's write side
        self.host_readable = False  # the host socket had bytes when last polled
        self.want: set[int] = {OP_REQUEST} if connecting else {OP_RESPONSE}
        self.finished = False  # nothing more to do: drop it
        self.reset_reason = ""
        self.host_open = True
        self.bytes_to_host = 0
        self.bytes_to_guest = 0

    # -- credit -----------------------------------------------------------------------------
    @property
    def peer_credit(self) -> int:
        """Bytes the guest can take now."""
        in_flight = (self.rx_cnt - self.peer_fwd_cnt) & U32
        return max(0, self.peer_buf_alloc - in_flight)

    def learn(self, h: Header) -> None:
        self.peer_buf_alloc = h.buf_alloc
        self.peer_fwd_cnt = h.fwd_cnt

    # -- from the guest -----------------------------------------------------------------------
    def from_guest(self, h: Header, payload: bytes) -> None:
        """A packet for this connection from the guest's tx queue."""
        self.learn(h)
        if h.op == OP_RST:
            self._close_host()
            self.finished = True
            return
        if h.op == OP_RESPONSE and self.state == "connecting":
            self.state = "established"
            self.want.discard(OP_REQUEST)
            self._greet_host()
            return
        if self.state != "established":
            self.reset("the guest broke the handshake")
            return
        if h.op == OP_RW:
            self._rw(payload)
        elif h.op == OP_SHUTDOWN:
            self.guest_shut_rcv |= bool(h.flags & SHUTDOWN_RCV)
            self.guest_shut_send |= bool(h.flags & SHUTDOWN_SEND)
            self.flush()
        elif h.op == OP_CREDIT_REQUEST:
            self.want.add(OP_CREDIT_UPDATE)
        elif h.op == OP_CREDIT_UPDATE:
            pass  # learned above
        else:
            self.reset(f"unexpected op {h.op} on an established stream")

    def _rw(self, payload: bytes) -> None:
        if self.guest_shut_send:
            self.reset("the guest sent data after shutting its side down")
            return
        if len(self.tx) + len(payload) > self.buf_bytes:
            self.reset(f"the guest sent past its credit of {self.buf_bytes} bytes")
            return
        self.tx += payload
        self.flush()

    def _greet_host(self) -> None:
        """Tell the host client the stream is up: `OK <host_port>\\n`."""
        line = f"OK {self.host_port}\n".encode()
        if not self.host_open:
            return
        try:
            if self.sock.send(line) != len(line):
                self.reset("the host client's socket is full")
        except OSError as e:
            self.reset(f"the host client went away ({_strerror(e)})")

    # -- to the host socket -------------------------------------------------------------------
    def flush(self) -> None:
        """Write buffered guest bytes to the host socket, as far as it takes them."""
        while self.tx and self.host_open:
            try:
                inject("vsock.host")
                n = self.sock.send(self.tx[:MAX_PAYLOAD_BYTES])
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                self.reset(f"the host peer went away ({_strerror(e)})")
                return
            del self.tx[:n]
            self.fwd_cnt = (self.fwd_cnt + n) & U32
            self.bytes_to_host += n
        if not self.host_open:
            return
        freed = (self.fwd_cnt - self.sent_fwd_cnt) & U32
        if freed and (not self.tx or freed >= self.buf_bytes // 2):
            self.want.add(OP_CREDIT_UPDATE)
        if not self.tx and self.guest_shut_send and not self.host_shut:
            self.host_shut = True
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # the peer is gone: its read side sees nothing either way
        self._maybe_done()

    def _maybe_done(self) -> None:
        """Both directions are over: end the stream with an RST, as Linux expects."""
        if self.tx or self.state != "established":
            return
        sending_over = self.guest_shut_send
        receiving_over = self.host_eof or self.guest_shut_rcv
        if sending_over and receiving_over:
            self.want = {OP_RST}
            self._close_host()

    # -- from the host socket -------------------------------------------------------------------
    @property
    def wants_host_read(self) -> bool:
        return (
            self.state == "established"
            and self.host_open
            and not self.host_eof
            and not self.guest_shut_rcv
            and not self.host_readable
            and self.peer_credit > 0
        )

    @property
    def wants_host_write(self) -> bool:
        return bool(self.tx) and self.host_open

    @property
    def has_for_guest(self) -> bool:
        if self.finished:
            return False
        if self.want:
            return True
        return (
            self.host_open
            and self.host_readable
            and self.peer_credit > 0
            and self.state == "established"
        )

    def packet_for_guest(self, room: int) -> tuple[Header, bytes] | None:
        """The next packet for the guest, with at most `room` payload bytes; None when
        there is nothing to send now."""
        if self.finished:
            return None
        if OP_RST in self.want:
            self.finished = True
            self._close_host()
            return self._header(OP_RST), b""
        for op in (OP_REQUEST, OP_RESPONSE):
            if op in self.want:
                self.want.discard(op)
                return self._header(op), b""
        if self.host_open and self.host_readable and self.peer_credit > 0:
            data = self._read_host(min(room, self.peer_credit, MAX_PAYLOAD_BYTES))
            if data:
                self.rx_cnt = (self.rx_cnt + len(data)) & U32
                self.bytes_to_guest += len(data)
                self.want.discard(OP_CREDIT_UPDATE)
                return self._header(OP_RW, len(data)), data
            if OP_RST in self.want:
                return self.packet_for_guest(room)
        if OP_SHUTDOWN in self.want:
            self.want.discard(OP_SHUTDOWN)
            self.want.discard(OP_CREDIT_UPDATE)
            return self._header(OP_SHUTDOWN, flags=SHUTDOWN_SEND), b""
        if OP_CREDIT_UPDATE in self.want:
            self.want.discard(OP_CREDIT_UPDATE)
            return self._header(OP_CREDIT_UPDATE), b""
        return None

    def _read_host(self, n: int) -> bytes:
        if n <= 0 or not self.host_open:
            return b""
        try:
            inject("vsock.host")
            data = self.sock.recv(n)
        except (BlockingIOError, InterruptedError):
            self.host_readable = False
            return b""
        except OSError as e:
            self.reset(f"the host peer went away ({_strerror(e)})")
            return b""
        if not data:
            self.host_readable = False
            self.host_eof = True
            self.want.add(OP_SHUTDOWN)
            self._maybe_done()
        return data

    def _header(self, op: int, length: int = 0, flags: int = 0) -> Header:
        self.sent_fwd_cnt = self.fwd_cnt
        return Header(
            HOST_CID,
            self.guest_cid,
            self.host_port,
            self.guest_port,
            length,
            TYPE_STREAM,
            op,
            flags,
            self.buf_bytes,
            self.fwd_cnt,
        )

    # -- ending ---------------------------------------------------------------------------------
    def reset(self, why: str) -> None:
        """End the stream: RST to the guest, the host socket closed, buffers dropped."""
        if not self.reset_reason:
            self.reset_reason = why
        self.tx.clear()
        self.want = {OP_RST}
        self._close_host()

    def _close_host(self) -> None:
        """Stop using the host socket; its owner stops watching it, then closes it."""
        self.host_open = False
        self.tx.clear()


def _strerror(e: OSError) -> str:
    return errno.errorcode.get(e.errno or 0, str(e))
