"""The machine's event loop: one thread serving device file descriptors.

Devices register readable fds (ioeventfds for their doorbells, tap devices, vsock
sockets, console input, disk completions) with a callback; the loop thread
(`kvmkit-events`) runs each callback when its fd is readable, so device work never
waits for a vCPU exit. `watch()` also waits for room to write (a vsock stream's host
socket that was full), calling back with (readable, writable). `quiesce()` parks the
loop between callbacks and holds it there (a pause, a snapshot and close need devices
still); `close()` stops it.
A callback that raises stops the machine through `on_error`, never the loop silently.
"""

import contextlib
import functools
import os
import selectors
import threading
from collections.abc import Callable, Iterator

Callback = Callable[[], None]
IoCallback = Callable[[bool, bool], None]  # (readable, writable)


class EventLoop:
    def __init__(self, on_error: Callable[[str, BaseException], None]) -> None:
        self.on_error = on_error
        self._selector = selectors.DefaultSelector()
        self._wake_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._selector.register(self._wake_fd, selectors.EVENT_READ, None)
        self._lock = threading.Condition()
        self._soon: list[Callback] = []
        self._holds = 0  # quiesce() callers: the loop stays parked while any hold
        self._parked = False
        self._closed = False
        self._thread: threading.Thread | None = None
        self.callbacks_run = 0

    # -- registration (any thread) --------------------------------------------------
    def add_reader(self, fd: int, callback: Callback, owner: str) -> None:
        with self._lock:
            self._selector.register(fd, selectors.EVENT_READ, (callback, owner, False))
        self._wake()

    def watch(self, fd: int, callback: IoCallback, owner: str, *, read: bool, write: bool) -> None:
        """Call `callback(readable, writable)` when `fd` is readable (`read`) or writable
        (`write`); a second call changes what is watched; neither stops watching. For
        sockets that wait for room as well as for data (vsock streams)."""
        events = (selectors.EVENT_READ if read else 0) | (selectors.EVENT_WRITE if write else 0)
        with self._lock:
            if not events:
                with contextlib.suppress(KeyError, ValueError):
                    self._selector.unregister(fd)
            else:
                try:
                    self._selector.modify(fd, events, (callback, owner, True))
                except KeyError:
                    self._selector.register(fd, events, (callback, owner, True))
        self._wake()

    def unwatch(self, fd: int) -> None:
        self.remove_reader(fd)

    def remove_reader(self, fd: int) -> None:
        with self._lock, contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(fd)
        self._wake()

    def call_soon(self, callback: Callback) -> None:
        """Run `callback` on the loop thread (before any further fd callback)."""
        with self._lock:
            self._soon.append(callback)
        self._wake()

    @property
    def readers(self) -> int:
        return len(self._selector.get_map()) - 1

    # -- lifecycle --------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None and not self._closed:
            self._thread = threading.Thread(target=self._run, name="kvmkit-events", daemon=True)
            self._thread.start()

    @contextlib.contextmanager
    def quiesced(self, timeout_s: float = 5.0) -> Iterator[None]:
        """Hold the loop parked between callbacks for the duration of the block."""
        self.hold(timeout_s)
        try:
            yield
        finally:
            self.release()

    def hold(self, timeout_s: float = 5.0) -> None:
        """Park the loop between callbacks until `release()` (holds nest)."""
        with self._lock:
            self._holds += 1
        self._wake()
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                self._lock.wait_for(lambda: self._parked or self._closed, timeout_s)

    def release(self) -> None:
        with self._lock:
            self._holds = max(0, self._holds - 1)
            self._lock.notify_all()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        self._wake()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5.0)
        self._selector.close()
        if self._wake_fd >= 0:
            os.close(self._wake_fd)
            self._wake_fd = -1

    # -- the loop thread -------------------------------------------------------------
    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            os.eventfd_write(self._wake_fd, 1)

    def _run(self) -> None:
        while True:
            with self._lock:
                if self._holds and not self._closed:
                    self._parked = True
                    self._lock.notify_all()
                    self._lock.wait_for(lambda: not self._holds or self._closed)
                    self._parked = False
                if self._closed:
                    return
                soon, self._soon = self._soon, []
            for callback in soon:
                self._call(callback, "a deferred call")
            try:
                ready = self._selector.select()
            except (OSError, ValueError):  # closed under us
                return
            for key, mask in ready:
                if key.data is None:
                    with contextlib.suppress(OSError):
                        os.eventfd_read(self._wake_fd)
                    continue
                with self._lock:
                    if self._holds or self._closed:
                        break  # park first; the fd stays readable and is seen again
                callback, owner, io = key.data
                if io:
                    readable = bool(mask & selectors.EVENT_READ)
                    writable = bool(mask & selectors.EVENT_WRITE)
                    self._call(functools.partial(callback, readable, writable), owner)
                else:
                    self._call(callback, owner)

    def _call(self, callback: Callback, owner: str) -> None:
        try:
            callback()
            self.callbacks_run += 1
        except Exception as e:  # a device bug must not end the loop without a word
            self.on_error(owner, e)
