"""Console output that never blocks the guest: a bounded buffer and a writer thread.

The UART hands each byte the guest transmits to `ConsoleOutput.write`, on a vCPU
thread. Writing to the real stream (a terminal, a file, a pipe nobody reads) happens on
the writer thread, so a stalled reader never stalls a vCPU or the control API: once
`limit_bytes` are waiting, further output is dropped and counted (`dropped`), and the
run summary says so.
"""

import contextlib
import io
import os
import stat
import threading
import time
from collections.abc import Callable
from typing import BinaryIO

DEFAULT_LIMIT = 1 << 20
STALL_S = 0.25  # a flush gives up on a stream that took nothing for this long


class ConsoleOutput:
    def __init__(
        self, stream: BinaryIO | None, limit_bytes: int = DEFAULT_LIMIT, owns_stream: bool = False
    ) -> None:
        self.stream = stream
        self.owns_stream = owns_stream  # close() closes it
        self.limit_bytes = limit_bytes
        self.dropped = 0
        self.written = 0
        self.error: str | None = None
        self.line_watchers: list[Callable[[bytes], None]] = []
        self._line = bytearray()
        self._buf = bytearray()
        self._cond = threading.Condition()
        self._busy = False  # the writer holds bytes taken from _buf
        self._closed = False
        self._thread: threading.Thread | None = None
        self._file = _is_regular_file(stream)  # a file never waits on a reader

    def write(self, data: bytes) -> None:
        """Queue guest output; never blocks for longer than a lock hand-off."""
        if self.line_watchers:
            self._watch(data)
        if self.stream is None:
            return
        with self._cond:
            room = self.limit_bytes - len(self._buf)
            if room < len(data):
                self.dropped += len(data) - max(room, 0)
                data = data[: max(room, 0)]
            if not data:
                return
            self._buf += data
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(
                    target=self._drain, name="kvmkit-console", daemon=True
                )
                self._thread.start()
            self._cond.notify()

    def _watch(self, data: bytes) -> None:
        """Hand complete lines to the watchers (a kernel panic detector, tests)."""
        self._line += data
        while (end := self._line.find(b"\n")) >= 0:
            line = bytes(self._line[:end])
            del self._line[: end + 1]
            for watcher in self.line_watchers:
                watcher(line)
        if len(self._line) > 4096:
            del self._line[:-4096]

    def _drain(self) -> None:
        while True:
            with self._cond:
                while not self._buf and not self._closed:
                    self._cond.wait()
                if not self._buf:
                    return
                chunk, self._buf = bytes(self._buf), bytearray()
                self._busy = True
            try:
                if self.error is None and self.stream is not None:
                    self.stream.write(chunk)
                    self.stream.flush()
                    self.written += len(chunk)
            except (OSError, ValueError) as e:  # the reader went away, or the file is full
                self.error = str(e) or type(e).__name__
                self.dropped += len(chunk)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def flush(self, timeout_s: float = 5.0, stall_s: float = STALL_S) -> bool:
        """Wait (at most `timeout_s`) until everything queued was written; False if the
        stream did not take it in time, or took nothing for `stall_s` (a reader that
        stopped reading: the rest is written or dropped later)."""
        deadline = time.monotonic() + timeout_s
        if self._file:  # slow at worst (a loaded host), never stalled: wait for it all
            stall_s = timeout_s
        with self._cond:
            written, since = self.written, time.monotonic()
            while self._buf or self._busy:
                now = time.monotonic()
                if self.written != written:
                    written, since = self.written, now
                left = min(deadline - now, since + stall_s - now)
                if left <= 0 or self._thread is None:
                    return False
                self._cond.wait(left)
        return True

    def close(self, timeout_s: float = 5.0) -> None:
        """Write what is queued (bounded by `timeout_s`), then stop the writer thread."""
        self.flush(timeout_s)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(0.1)
        with contextlib.suppress(OSError, ValueError):
            if self.stream is not None and not self._busy:
                self.stream.flush()
                if self.owns_stream:
                    self.stream.close()


def _is_regular_file(stream: BinaryIO | None) -> bool:
    try:
        return stream is not None and stat.S_ISREG(os.fstat(stream.fileno()).st_mode)
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        return False  # a stream without an fd (a test's BytesIO) is written at once
