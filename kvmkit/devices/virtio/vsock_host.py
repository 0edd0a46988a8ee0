"""The host side of a hybrid vsock (Firecracker's design): guest AF_VSOCK streams
carried over host AF_UNIX sockets.

- Guest to host: a guest connection to host (CID 2) port P is a unix stream
  connection to `<uds>_P`; nobody listening there means an RST (ECONNRESET in the
  guest).
- Host to guest: a host client connects to `<uds>` and writes `CONNECT P\\n`; kvmkit
  asks the guest for a stream to its port P from a local port L (2**30 and up), and
  writes `OK L\\n` to the client once the guest accepts; then the same socket is the
  stream. A refused connection (no listener in the guest) closes the client's socket.

Untrusted peers: at most `MAX_CONNECTIONS` streams and `MAX_WAITING_CLIENTS` host
clients that have not finished their CONNECT line (a 32-byte line at most; the oldest
waiting client is dropped for a new one); per-stream buffering as vsock_conn.py says.
Packets for unknown streams are answered with an RST (at most `MAX_LOOSE_RSTS` wait).

Everything runs under the owning device's lock: the guest's packets (the device's tx
queue), packets for the guest (`packet_for_guest`, as the device fills rx buffers)
and the host sockets' events (`FdWatcher` callbacks on the machine's event loop).
"""

import contextlib
import functools
import os
import socket
import threading
from collections import OrderedDict, deque
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from kvmkit.devices.virtio.vsock_conn import (
    HOST_CID,
    OP_REQUEST,
    OP_RST,
    TYPE_STREAM,
    Connection,
    Header,
)
from kvmkit.errors import ConfigError
from kvmkit.unix_socket import claim_unix_path

MAX_CONNECTIONS = 256
MAX_WAITING_CLIENTS = 32
MAX_CONNECT_LINE = 32
MAX_LOOSE_RSTS = 128
FIRST_LOCAL_PORT = 1 << 30
Key = tuple[int, int]  # (guest port, host port)


class FdWatcher(Protocol):
    """The machine's event loop, as far as host sockets need it."""

    def watch(
        self,
        fd: int,
        callback: Callable[[bool, bool], None],
        owner: str,
        *,
        read: bool,
        write: bool,
    ) -> None:
        """Call `callback(readable, writable)` on the loop when `fd` is ready as asked;
        neither: stop watching."""

    def unwatch(self, fd: int) -> None: ...


class HybridVsockHost:
    """Streams between guest `guest_cid` and unix sockets at `uds` (listening) and
    `uds_<PORT>` (connected to). `on_ready()` is called when packets wait for the
    guest after a host socket event."""

    def __init__(
        self,
        name: str,
        guest_cid: int,
        uds: str,
        watcher: FdWatcher,
        lock: threading.RLock,
        on_ready: Callable[[], None],
    ) -> None:
        self.name = name
        self.guest_cid = guest_cid
        self.uds = uds
        self.watcher = watcher
        self.lock = lock
        self.on_ready = on_ready
        self.conns: dict[Key, Connection] = {}
        self.ready: OrderedDict[Key, None] = OrderedDict()  # streams with packets to send
        self.loose_rsts: deque[Header] = deque(maxlen=MAX_LOOSE_RSTS)
        self.waiting: OrderedDict[int, tuple[socket.socket, bytearray]] = OrderedDict()
        self.next_port = FIRST_LOCAL_PORT
        self.listener: socket.socket | None = None
        self.resets = 0  # streams ended by an RST kvmkit sent
        self.refused = 0  # guest connections nobody listened for on the host
        self.opened = 0  # streams set up, either way

    # -- the listening socket ---------------------------------------------------------------
    def start(self) -> None:
        """Listen at `uds` for host clients."""
        claim_unix_path(self.uds, f"vsock {self.name}'s socket")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        try:
            sock.bind(self.uds)
            sock.listen(16)
        except OSError as e:
            sock.close()
            raise ConfigError(f"vsock socket {self.uds}: {os.strerror(e.errno or 0)}") from None
        self.listener = sock
        self.watcher.watch(sock.fileno(), self._accept, self.name, read=True, write=False)

    def _accept(self, readable: bool, writable: bool) -> None:
        with self.lock:
            if self.listener is None:
                return
            try:
                client, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # the client gave up already (ECONNABORTED) or fds ran out
            client.setblocking(False)
            if len(self.waiting) >= MAX_WAITING_CLIENTS:
                _, (old, _) = self.waiting.popitem(last=False)
                self._drop_waiting(old)
            fd = client.fileno()
            self.waiting[fd] = (client, bytearray())
            self.watcher.watch(
                fd,
                functools.partial(self._connect_line, fd),
                self.name,
                read=True,
                write=False,
            )

    def _drop_waiting(self, client: socket.socket) -> None:
        self.watcher.unwatch(client.fileno())
        client.close()

    def _connect_line(self, fd: int, readable: bool, writable: bool) -> None:
        """Read a waiting client's `CONNECT P\\n`, a byte at a time so nothing after the
        line is taken from the stream."""
        with self.lock:
            entry = self.waiting.get(fd)
            if entry is None:
                return
            client, line = entry
            while True:
                try:
                    byte = client.recv(1)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError:
                    byte = b""
                if not byte:
                    del self.waiting[fd]
                    self._drop_waiting(client)
                    return
                if byte != b"\n":
                    line += byte
                    if len(line) > MAX_CONNECT_LINE:
                        del self.waiting[fd]
                        self._drop_waiting(client)
                        return
                    continue
                del self.waiting[fd]
                self.watcher.unwatch(fd)
                port = _parse_connect(bytes(line))
                if port is None or len(self.conns) >= MAX_CONNECTIONS:
                    client.close()
                    return
                self._host_connect(client, port)
                break
        self._kick()

    def _host_connect(self, client: socket.socket, guest_port: int) -> None:
        host_port = self._local_port(guest_port)
        conn = Connection(client, self.guest_cid, guest_port, host_port, connecting=True)
        self._add(conn)

    def _local_port(self, guest_port: int) -> int:
        for _ in range(MAX_CONNECTIONS + 1):
            port = self.next_port
            self.next_port = port + 1 if port < 0xFFFF_FFFE else FIRST_LOCAL_PORT
            if (guest_port, port) not in self.conns:
                return port
        raise AssertionError("no free local port among MAX_CONNECTIONS + 1")

    # -- streams ------------------------------------------------------------------------------
    def _add(self, conn: Connection) -> None:
        key = (conn.guest_port, conn.host_port)
        self.conns[key] = conn
        self.opened += 1
        self._refresh(key, conn)

    def _refresh(self, key: Key, conn: Connection) -> None:
        """After anything happened to `conn`: its place in the send order, what its host
        socket is watched for, and its end."""
        fd = conn.sock.fileno()
        if not conn.host_open and fd >= 0:
            self.watcher.unwatch(fd)
            conn.sock.close()
            fd = -1
        if fd >= 0:
            self.watcher.watch(
                fd,
                functools.partial(self._host_event, key),
                self.name,
                read=conn.wants_host_read,
                write=conn.wants_host_write,
            )
        if conn.finished:
            if conn.reset_reason:
                self.resets += 1
            self.conns.pop(key, None)
            self.ready.pop(key, None)
        elif conn.has_for_guest:
            self.ready[key] = None
        else:
            self.ready.pop(key, None)

    def _host_event(self, key: Key, readable: bool, writable: bool) -> None:
        with self.lock:
            conn = self.conns.get(key)
            if conn is None:
                return
            if writable:
                conn.flush()
            if readable and conn.host_open:
                conn.host_readable = True
            self._refresh(key, conn)
        self._kick()

    def _kick(self) -> None:
        if self.ready or self.loose_rsts:
            self.on_ready()

    # -- the guest's packets -------------------------------------------------------------------
    def from_guest(self, h: Header, payload: bytes) -> None:
        """A packet from the guest's tx queue (header checked for size by the device)."""
        if h.dst_cid != HOST_CID or h.src_cid != self.guest_cid:
            return  # not for us, or spoofed: dropped (Firecracker does the same)
        key = (h.src_port, h.dst_port)
        if h.type != TYPE_STREAM:
            if h.op != OP_RST:
                self._loose_rst(h)
            return
        conn = self.conns.get(key)
        if conn is None:
            if h.op == OP_REQUEST:
                self._guest_connect(h)
            elif h.op != OP_RST:
                self._loose_rst(h)
            return
        if h.op == OP_REQUEST:
            conn.reset("the guest asked again for a stream it has")
        else:
            conn.from_guest(h, payload)
        self._refresh(key, conn)

    def _guest_connect(self, h: Header) -> None:
        if len(self.conns) >= MAX_CONNECTIONS:
            self.refused += 1
            self._loose_rst(h)
            return
        path = f"{self.uds}_{h.dst_port}"
        try:  # out of fds (EMFILE) refuses this stream like a host nobody listens on
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        except OSError:
            self.refused += 1
            self._loose_rst(h)
            return
        try:
            sock.connect(path)
        except OSError:  # nobody listens (ENOENT, ECONNREFUSED) or the backlog is full
            sock.close()
            self.refused += 1
            self._loose_rst(h)
            return
        conn = Connection(sock, self.guest_cid, h.src_port, h.dst_port, connecting=False)
        conn.learn(h)
        self._add(conn)

    def _loose_rst(self, h: Header) -> None:
        self.loose_rsts.append(
            Header(HOST_CID, self.guest_cid, h.dst_port, h.src_port, 0, TYPE_STREAM, OP_RST)
        )

    # -- packets for the guest -------------------------------------------------------------------
    @property
    def has_for_guest(self) -> bool:
        return bool(self.loose_rsts or self.ready)

    def packet_for_guest(self, room: int) -> tuple[Header, bytes] | None:
        """The next packet for the guest's rx queue (payload at most `room` bytes), taking
        streams in turn; None when nothing is ready."""
        if self.loose_rsts:
            return self.loose_rsts.popleft(), b""
        while self.ready:
            key = next(iter(self.ready))
            conn = self.conns.get(key)
            if conn is None:
                self.ready.pop(key, None)
                continue
            packet = conn.packet_for_guest(room)
            self.ready.pop(key, None)
            self._refresh(key, conn)  # back at the end of the order if it has more
            if packet is not None:
                return packet
        return None

    # -- ending -----------------------------------------------------------------------------------
    def drop_streams(self) -> None:
        """Forget every stream (a device reset, or a transport reset after a restore): the
        host sockets are closed, their peers see EOF."""
        for key, conn in list(self.conns.items()):
            conn.host_open = False
            self._refresh_closed(key, conn)
        self.conns.clear()
        self.ready.clear()
        self.loose_rsts.clear()

    def _refresh_closed(self, key: Key, conn: Connection) -> None:
        fd = conn.sock.fileno()
        if fd >= 0:
            self.watcher.unwatch(fd)
            conn.sock.close()

    def close(self) -> None:
        self.drop_streams()
        for client, _ in self.waiting.values():
            self._drop_waiting(client)
        self.waiting.clear()
        if self.listener is not None:
            self.watcher.unwatch(self.listener.fileno())
            self.listener.close()
            self.listener = None
            with contextlib.suppress(OSError):
                Path(self.uds).unlink()


def _parse_connect(line: bytes) -> int | None:
    """The port of `CONNECT P` (a trailing CR allowed), or None."""
    text = line.decode("ascii", "replace").removesuffix("\r")
    verb, _, port = text.partition(" ")
    if verb != "CONNECT" or not port.isdigit() or not port.isascii() or len(port) > 10:
        return None
    value = int(port)
    return value if value <= 0xFFFF_FFFF else None
