"""The hybrid vsock's host side on real unix sockets and the machine's event loop: the
test plays the guest driver, sending packets as its tx queue would and taking the
packets the device would put in its rx buffers."""

import socket
import threading
import time

import pytest

from kvmkit.devices.virtio.vsock_conn import (
    BUF_BYTES,
    HEADER_BYTES,
    HOST_CID,
    OP_CREDIT_UPDATE,
    OP_REQUEST,
    OP_RESPONSE,
    OP_RST,
    OP_RW,
    OP_SHUTDOWN,
    SHUTDOWN_RCV,
    SHUTDOWN_SEND,
    TYPE_STREAM,
    Header,
)
from kvmkit.devices.virtio.vsock_host import FIRST_LOCAL_PORT, HybridVsockHost
from kvmkit.machine.event_loop import EventLoop

CID = 3
GUEST_BUF = 64 << 10


class Guest:
    """The guest's end: packets in, packets out, its own credit bookkeeping."""

    def __init__(self, host: HybridVsockHost, ready: threading.Event) -> None:
        self.host = host
        self.ready = ready
        self.fwd_cnt = 0

    def send(self, op, src_port, dst_port, data=b"", flags=0, buf_alloc=GUEST_BUF, cid=CID):
        h = Header(cid, HOST_CID, src_port, dst_port, len(data), TYPE_STREAM, op, flags)
        h = Header(*list(h.__dict__.values())[:8], buf_alloc, self.fwd_cnt)
        with self.host.lock:
            self.host.from_guest(h, data)

    def take(self, room=4096) -> list[tuple[Header, bytes]]:
        with self.host.lock:
            out = []
            while (p := self.host.packet_for_guest(room)) is not None:
                out.append(p)
                self.fwd_cnt += len(p[1])
            self.ready.clear()
            return out

    def wait(self, until, timeout_s=10.0) -> list[tuple[Header, bytes]]:
        """Packets until `until(packets)` holds."""
        got: list[tuple[Header, bytes]] = []
        deadline = time.monotonic() + timeout_s
        while not until(got):
            got += self.take()
            if until(got):
                break
            left = deadline - time.monotonic()
            assert left > 0, f"not there in time; got {[(h.op, len(d)) for h, d in got]}"
            self.ready.wait(min(left, 0.2))
        return got


@pytest.fixture
def rig(tmp_path):
    loop = EventLoop(lambda owner, e: pytest.fail(f"{owner}: {e!r}"))
    loop.start()
    ready = threading.Event()
    uds = str(tmp_path / "v.sock")
    host = HybridVsockHost("vsock", CID, uds, loop, threading.RLock(), ready.set)
    host.start()
    try:
        yield Guest(host, ready), uds
    finally:
        with host.lock:
            host.close()
        loop.close()


def _listen(path):
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    server.settimeout(10)
    return server


def _closed(sock) -> bool:
    """The peer closed `sock` (with unread bytes it resets it instead)."""
    try:
        return sock.recv(100) == b""
    except ConnectionResetError:
        return True


def _data(packets):
    return b"".join(d for h, d in packets if h.op == OP_RW)


def test_the_header_is_44_bytes_little_endian():
    h = Header(3, 2, 1024, 52, 5, TYPE_STREAM, OP_RW, 0, BUF_BYTES, 7)
    raw = h.pack()
    assert len(raw) == HEADER_BYTES == 44
    assert raw[:8] == (3).to_bytes(8, "little") and raw[28:30] == b"\x01\x00"
    assert Header.unpack(raw) == h


def test_a_guest_connection_to_port_p_reaches_uds_p_both_ways(rig):
    guest, uds = rig
    with _listen(f"{uds}_52") as server:
        guest.send(OP_REQUEST, 1024, 52)
        ((h, _),) = guest.take()
        assert (h.op, h.src_port, h.dst_port, h.dst_cid) == (OP_RESPONSE, 52, 1024, CID)
        assert h.buf_alloc == BUF_BYTES
        peer, _ = server.accept()
        with peer:
            guest.send(OP_RW, 1024, 52, b"hello host")
            assert peer.recv(100) == b"hello host"
            peer.sendall(b"hello guest")
            got = guest.wait(lambda p: _data(p) == b"hello guest")
            assert all(h.dst_port == 1024 and h.fwd_cnt == 10 for h, _ in got)


def test_nobody_listening_on_the_host_is_a_reset(rig):
    guest, _ = rig
    guest.send(OP_REQUEST, 1025, 99)
    assert [h.op for h, _ in guest.take()] == [OP_RST]
    assert guest.host.refused == 1


def test_a_host_client_connects_with_connect_and_gets_ok(rig):
    guest, uds = rig
    with socket.socket(socket.AF_UNIX) as client:
        client.settimeout(10)
        client.connect(uds)
        client.sendall(b"CONNECT 5000\nearly bytes")
        ((h, _),) = guest.wait(lambda p: len(p) == 1)
        assert (h.op, h.dst_port, h.dst_cid) == (OP_REQUEST, 5000, CID)
        assert h.src_port >= FIRST_LOCAL_PORT
        guest.send(OP_RESPONSE, 5000, h.src_port)
        assert client.recv(100) == f"OK {h.src_port}\n".encode()
        got = guest.wait(lambda p: _data(p) == b"early bytes")  # nothing after the line lost
        guest.send(OP_RW, 5000, h.src_port, b"from the guest")
        assert client.recv(100) == b"from the guest"
    assert got


@pytest.mark.parametrize("line", [b"CONNECT\n", b"CONNECT x\n", b"HELLO 5\n", b"C" * 40])
def test_a_bad_connect_line_closes_the_client(rig, line):
    guest, uds = rig
    with socket.socket(socket.AF_UNIX) as client:
        client.settimeout(10)
        client.connect(uds)
        client.sendall(line)
        assert _closed(client)
    assert guest.take() == []


def test_a_refused_host_connection_closes_the_client(rig):
    guest, uds = rig
    with socket.socket(socket.AF_UNIX) as client:
        client.settimeout(10)
        client.connect(uds)
        client.sendall(b"CONNECT 7\n")
        ((h, _),) = guest.wait(lambda p: len(p) == 1)
        guest.send(OP_RST, 7, h.src_port)
        assert client.recv(100) == b""


def test_a_host_peer_that_never_reads_costs_at_most_the_advertised_buffer(rig):
    guest, uds = rig
    with _listen(f"{uds}_53") as server:
        guest.send(OP_REQUEST, 1026, 53)
        guest.take()
        peer, _ = server.accept()
        with peer:
            peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            chunk = bytes(32 << 10)
            sent = 0
            conn = guest.host.conns[(1026, 53)]
            while sent + len(chunk) <= BUF_BYTES:
                guest.send(OP_RW, 1026, 53, chunk)
                sent += len(chunk)
            assert len(conn.tx) <= BUF_BYTES
            # Past the credit kvmkit gave: the stream is reset, its buffer dropped.
            in_flight = sent - conn.fwd_cnt
            guest.send(OP_RW, 1026, 53, bytes(BUF_BYTES - in_flight + 1))
            assert [h.op for h, _ in guest.take()][-1] == OP_RST
            assert (1026, 53) not in guest.host.conns


def test_host_bytes_go_to_the_guest_only_as_far_as_its_credit(rig):
    guest, uds = rig
    with _listen(f"{uds}_54") as server:
        guest.send(OP_REQUEST, 1027, 54, buf_alloc=1000)
        guest.take()
        peer, _ = server.accept()
        with peer:
            peer.sendall(bytes(5000))
            got = guest.wait(lambda p: len(_data(p)) == 1000)
            time.sleep(0.1)
            assert guest.take() == []  # no credit: nothing more, and nothing buffered
            assert guest.host.conns[(1027, 54)].tx == bytearray()
            guest.send(OP_CREDIT_UPDATE, 1027, 54, buf_alloc=1000)  # it read 1000
            got = guest.wait(lambda p: len(_data(p)) == 1000)
    assert got


def test_a_vanished_host_peer_resets_the_guest_stream(rig):
    guest, uds = rig
    with _listen(f"{uds}_55") as server:
        guest.send(OP_REQUEST, 1028, 55)
        guest.take()
        peer, _ = server.accept()
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        guest.send(OP_RW, 1028, 55, b"unread")
        peer.close()  # unread data: the peer resets
        guest.send(OP_RW, 1028, 55, b"more")
        got = guest.wait(lambda p: any(h.op == OP_RST for h, _ in p))
        assert got[-1][0].op == OP_RST and (1028, 55) not in guest.host.conns
        assert guest.host.resets == 1


def test_host_eof_is_a_shutdown_and_a_full_close_ends_with_a_reset(rig):
    guest, uds = rig
    with _listen(f"{uds}_56") as server:
        guest.send(OP_REQUEST, 1029, 56)
        guest.take()
        peer, _ = server.accept()
        with peer:
            peer.sendall(b"last words")
            peer.shutdown(socket.SHUT_WR)
            got = guest.wait(lambda p: any(h.op == OP_SHUTDOWN for h, _ in p))
            assert _data(got) == b"last words"
            assert got[-1][0].flags == SHUTDOWN_SEND
            guest.send(OP_RW, 1029, 56, b"still open")  # a half-closed stream carries on
            assert peer.recv(100) == b"still open"
            guest.send(OP_SHUTDOWN, 1029, 56, flags=SHUTDOWN_RCV | SHUTDOWN_SEND)
            assert [h.op for h, _ in guest.take()] == [OP_RST]
            assert peer.recv(100) == b""
    assert not guest.host.conns


def test_packets_from_another_cid_or_for_another_cid_are_dropped(rig):
    guest, _ = rig
    guest.send(OP_REQUEST, 1030, 57, cid=9)
    assert guest.take() == []


def test_closing_removes_the_socket_file(rig, tmp_path):
    guest, uds = rig
    with guest.host.lock:
        guest.host.close()
    assert not (tmp_path / "v.sock").exists()
