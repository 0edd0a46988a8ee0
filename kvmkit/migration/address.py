"""Migration endpoints: `tcp:HOST:PORT` or `unix:PATH`."""

import contextlib
import socket
from dataclasses import dataclass

from kvmkit.errors import ConfigError
from kvmkit.unix_socket import claim_unix_path

SOCKET_BUFFER_BYTES = 4 << 20


@dataclass(frozen=True)
class Address:
    kind: str  # "tcp" or "unix"
    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        return f"tcp:{self.host}:{self.port}" if self.kind == "tcp" else f"unix:{self.path}"


def parse_address(text: str) -> Address:
    kind, _, rest = text.partition(":")
    if kind == "unix" and rest:
        return Address("unix", path=rest)
    if kind == "tcp":
        host, _, port = rest.rpartition(":")
        if host and port.isascii() and port.isdigit() and 0 < int(port) < 65536:
            return Address("tcp", host=host.strip("[]"), port=int(port))
    raise ConfigError(
        f"migration address {text!r} is not tcp:HOST:PORT or unix:PATH,"
        " e.g. tcp:127.0.0.1:4444 or unix:/tmp/migrate.sock"
    )


def _tune(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER_BYTES)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER_BYTES)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def connect(address: Address, timeout_s: float = 10.0) -> socket.socket:
    try:
        if address.kind == "tcp":
            sock = socket.create_connection((address.host, address.port), timeout=timeout_s)
        else:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout_s)
            sock.connect(address.path)
    except OSError as e:
        raise ConfigError(
            f"cannot reach a migration target at {address}: {e.strerror or e}: start one with"
            f" 'kvmkit migrate receive --listen {address}'"
        ) from None
    sock.settimeout(None)
    _tune(sock)
    return sock


def listen(address: Address) -> socket.socket:
    if address.kind == "tcp":
        family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        target: str | tuple[str, int] = (address.host, address.port)
    else:
        claim_unix_path(address.path, "the migration socket")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        target = address.path
    try:
        sock.bind(target)
        sock.listen(1)
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {address}: {e.strerror or e}") from None
    return sock
