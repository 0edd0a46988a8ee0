"""Opening a machine's console: the UART's output to stdout, a file, a stream, or
nowhere, always through a non-blocking `ConsoleOutput`."""

import contextlib
import os
import stat
import sys
from typing import BinaryIO

from kvmkit.devices.console import ConsoleOutput
from kvmkit.devices.serial import Serial16550
from kvmkit.errors import ConfigError
from kvmkit.machine.event_loop import EventLoop

READ_BYTES = 4096


def open_console(target: str | None, stream: BinaryIO | None = None) -> ConsoleOutput:
    """`stream` if given; else by `target`: None for stdout, "none" for nowhere, or a
    file path (created or truncated)."""
    if stream is not None:
        return ConsoleOutput(stream)
    if target == "none":
        return ConsoleOutput(None)
    if target is None:
        return ConsoleOutput(sys.stdout.buffer)
    try:
        f = open(target, "wb")  # noqa: SIM115 (closed with the console)
    except IsADirectoryError:
        raise ConfigError(f"console {target}: is a directory: give a file name") from None
    except OSError as e:
        raise ConfigError(f"cannot open console file {target}: {e.strerror}") from None
    return ConsoleOutput(f, owns_stream=True)


class ConsoleInput:
    """Host input (stdin, a pipe) to the UART, on the event loop. What the UART cannot
    take yet waits here, and the fd is not read again until the guest has read what
    waits: a fast writer is slowed to the guest's pace, and nothing is lost."""

    def __init__(self, fd: int, serial: Serial16550, events: EventLoop) -> None:
        self.fd = fd
        self.serial = serial
        self.events = events
        self.held = b""
        self.eof = False
        self.bytes_read = 0
        serial.on_room = lambda: events.call_soon(self._room)
        events.add_reader(fd, self._readable, "console input")

    def _readable(self) -> None:
        try:
            data = os.read(self.fd, READ_BYTES)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.eof = True
            self.events.remove_reader(self.fd)
            return
        self.bytes_read += len(data)
        self.held = data[self.serial.feed(data) :]
        if self.held:
            self.events.remove_reader(self.fd)  # until the guest makes room

    def _room(self) -> None:
        if self.held:
            self.held = self.held[self.serial.feed(self.held) :]
        if not self.held and not self.eof:
            with contextlib.suppress(KeyError, ValueError):
                self.events.add_reader(self.fd, self._readable, "console input")


def stdin_for_console() -> int | None:
    """Standard input's fd when it can feed the console: a pipe or file, or the
    terminal when this process is in the foreground (a background job reading its
    terminal would be stopped by SIGTTIN)."""
    try:
        mode = os.fstat(0).st_mode
    except OSError:
        return None
    if stat.S_ISCHR(mode) and os.isatty(0):
        try:
            return 0 if os.tcgetpgrp(0) == os.getpgrp() else None
        except OSError:
            return None
    if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
        return 0
    return None  # /dev/null, other devices, regular files (epoll cannot watch them)
