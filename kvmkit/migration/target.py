"""The receiving side of a live migration: accept one connection (on any of the
addresses listened on), build an empty machine from the description, write pages as
they come, load the final state, and start only on the source's `go`. Every section
is checksummed and verified before it is used; any failure before the start discards
everything received (the machine is closed, never run)."""

import contextlib
import os
import selectors
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

from kvmkit.errors import KvmkitError
from kvmkit.faults import enter_phase
from kvmkit.machine.builder import RestoreOptions, build_from_saved
from kvmkit.machine.machine import Machine
from kvmkit.memory import PAGE_SIZE, GuestMemory
from kvmkit.migration.address import Address, listen, parse_address
from kvmkit.migration.channel import Channel
from kvmkit.migration.pages import PageStats, iteration_info, receive_pages
from kvmkit.snapshot.format import (
    END,
    ITERATION,
    PAGES,
    StreamFormatError,
    StreamReader,
)
from kvmkit.snapshot.machine_state import (
    expect_section,
    read_machine_description,
    read_state,
)
from kvmkit.snapshot.model import MachineDescription, MachineState

GO_TIMEOUT_S = 60.0
PROGRESS_EVERY_S = 0.1


class IncomingMigrationError(KvmkitError):
    """The incoming migration failed; nothing was started here."""


@dataclass
class ReceiveReport:
    source: str = ""
    listened_on: str = ""
    iterations: int = 0
    bytes_received: int = 0
    pages: int = 0
    zero_pages: int = 0
    receive_s: float = 0.0


ProgressFn = Callable[[dict[str, Any]], None]


class _Populator:
    """Allocates the runs the source announced, ahead of their data, on a helper thread
    (GuestMemory.populate_file_range): receiving then writes into pages that exist."""

    STEP = 8 << 20  # between looks at the stop flag

    def __init__(self, memory: GuestMemory, runs: list[tuple[int, int]]) -> None:
        self.memory = memory
        self.runs = runs
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kvmkit-populate", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for offset, length in self.runs:
            for at in range(offset, offset + length, self.STEP):
                if self._stop.is_set():
                    return
                self.memory.populate_file_range(at, min(self.STEP, offset + length - at))

    def stop(self, wait: bool = True) -> None:
        """Stop populating; `wait=False` when the machine keeps its memory (the thread
        ends within a step, and must not add to the downtime)."""
        self._stop.set()
        if wait:
            self._thread.join()


@dataclass
class _StreamSource:
    """The incoming stream as a builder's saved source: once the machine's memory
    exists, say `ready`, then take pages into it up to the state."""

    incoming: "IncomingMigration"
    reader: StreamReader
    header: dict[str, Any]
    description: MachineDescription
    progress: ProgressFn | None
    what: str = "the incoming migration"

    def load(self, memory: GuestMemory) -> MachineState:
        channel = self.incoming.channel
        assert channel is not None
        channel.send_message({"msg": "ready"})
        enter_phase("migration.precopy")
        self.incoming._event({"phase": "precopy"}, self.progress, force=True)
        return self.incoming.read_stream(
            self.reader, memory, self.header, self.description, self.progress
        )


class IncomingMigration:
    """`IncomingMigration([addresses])`: listen at once (so a source can connect as
    soon as this returns); `receive()` takes the first connection on any address and
    returns a loaded machine that has not run; `commit()` waits for the source's go;
    then run the machine, with `confirm_when_running()` telling the source it runs."""

    def __init__(self, listen_at: str | Sequence[str]) -> None:
        texts = [listen_at] if isinstance(listen_at, str) else list(listen_at)
        if not texts:
            raise IncomingMigrationError("give at least one address to listen on")
        self.addresses: list[Address] = [parse_address(t) for t in texts]
        self.listeners: list[socket.socket] = []
        try:
            for address in self.addresses:
                self.listeners.append(listen(address))
        except BaseException:
            self.close()
            raise
        self.channel: Channel | None = None
        self.machine: Machine | None = None
        self.report = ReceiveReport()
        self._last_event = 0.0
        self._aborted = threading.Event()

    @property
    def address(self) -> str:
        return ", ".join(str(a) for a in self.addresses)

    def _accept(self, timeout_s: float | None) -> tuple[socket.socket, Address, str]:
        with selectors.DefaultSelector() as selector:
            for sock, address in zip(self.listeners, self.addresses, strict=True):
                selector.register(sock, selectors.EVENT_READ, address)
            ready = selector.select(timeout_s)
        if not ready:
            raise IncomingMigrationError(
                f"no source connected to {self.address} within {timeout_s:g} s"
            )
        key, _ = ready[0]
        conn, peer = key.fileobj.accept()  # type: ignore[union-attr]
        source = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "a unix socket peer"
        return conn, key.data, source

    def receive(
        self,
        *,
        memory_backend: str | None = None,
        console: str | None = None,
        console_stream: BinaryIO | None = None,
        accept_timeout_s: float | None = None,
        progress: ProgressFn | None = None,
        drive_paths: dict[str, str] | None = None,
        net_taps: dict[str, str] | None = None,
        vsock_uds: str | None = None,
    ) -> Machine:
        """`drive_paths`: drive id -> the backing file to use here (default: the
        source's path, which must then exist here too); `net_taps`: interface id -> the
        tap to attach here; `vsock_uds`: the vsock socket path here."""
        try:
            sock, address, source = self._accept(accept_timeout_s)
        finally:
            self.close()  # one migration per listener: nobody else gets in
        sock.settimeout(None)
        enter_phase("migration.handshake")
        self.channel = Channel(sock)
        self.report.source, self.report.listened_on = source, str(address)
        start = time.monotonic()
        try:
            self.machine = self._receive(
                RestoreOptions(
                    memory_backend, console, console_stream, drive_paths, net_taps, vsock_uds
                ),
                progress,
            )
        except (KvmkitError, OSError) as e:
            self._refuse(str(e))
            raise IncomingMigrationError(
                f"incoming migration from {source} failed: {e}; nothing was started here"
            ) from None
        self.report.receive_s = time.monotonic() - start
        self.report.bytes_received = self.channel.received
        return self.machine

    def _event(self, event: dict[str, Any], progress: ProgressFn | None, force: bool) -> None:
        now = time.monotonic()
        if progress is None or (not force and now - self._last_event < PROGRESS_EVERY_S):
            return
        self._last_event = now
        assert self.channel is not None
        progress(
            {
                "iteration": self.report.iterations,
                "bytes_received": self.channel.received,
                "pages": self.report.pages,
                **event,
            }
        )

    def _receive(
        self,
        options: RestoreOptions,
        progress: ProgressFn | None,
    ) -> Machine:
        assert self.channel is not None
        reader = StreamReader(
            self.channel, "the migration stream", peer="the source", kind="migration stream"
        )
        try:
            header = reader.read_header()
            if header.get("kind") != "migration":
                raise StreamFormatError(f"the stream is a {header.get('kind')!r}, not a migration")
            description = read_machine_description(reader)
            source = _StreamSource(self, reader, header, description, progress)
            machine = build_from_saved(source, options)
        finally:
            reader.close()  # its checksum helper, whether or not the stream was read
        try:
            self.channel.send_message({"msg": "loaded"})
            self._event({"phase": "loaded"}, progress, force=True)
        except BaseException:
            machine.close()
            raise
        machine.migrated_from = self.report.source
        return machine

    def read_stream(
        self,
        reader: StreamReader,
        memory: GuestMemory,
        header: dict[str, Any],
        description: MachineDescription,
        progress: ProgressFn | None,
    ) -> MachineState:
        """Pages into `memory`, then the state, up to END; every section verified."""
        report = self.report
        stats = PageStats()
        phase = "precopy"
        populator: _Populator | None = None
        pass_bytes = pass_done = 0  # the current pass: its size (as announced), received
        try:
            while phase != "state":  # pages and markers, up to the state's marker
                head = reader.next_section()
                if head.tag == PAGES and not head.flags:
                    got = receive_pages(reader.open_payload(head), memory)
                    stats.add(got)
                    report.pages, report.zero_pages = stats.pages, stats.zero_pages
                    pass_done += got.pages * PAGE_SIZE
                    event = {"phase": phase, "iteration_bytes": pass_bytes, "done": pass_done}
                    self._event(event, progress, force=False)
                    continue
                if head.tag != ITERATION:
                    raise StreamFormatError(
                        f"{head.label}: a pre-copy stream has pages and iteration markers here"
                    )
                label = f"{reader.what}: {head.label}"
                info = iteration_info(reader.read_payload(head), memory.size_bytes, label)
                phase = info.phase or phase
                report.iterations = max(report.iterations, info.iteration or 0)
                if info.bytes is not None:
                    pass_bytes, pass_done = info.bytes, 0
                if populator is None and info.runs:
                    populator = _Populator(memory, info.runs)
                if info.sync:  # everything before it is in: say so
                    if populator is not None:
                        populator.stop()  # the guest still runs on the source
                    assert self.channel is not None
                    self.channel.send_message({"msg": "synced"})
                    continue
                self._event({"phase": phase}, progress, force=True)
            enter_phase("migration.state")
            state = read_state(reader, header, description)
            expect_section(reader, END, "end marker")
        except BaseException:
            reader.close()  # its checksum helper may still read guest RAM
            if populator is not None:
                populator.stop()  # before the machine and its memory are closed
            raise
        reader.close()
        if populator is not None:
            populator.stop(wait=False)
        return state

    def _refuse(self, why: str) -> None:
        if self.channel is not None:
            with contextlib.suppress(KvmkitError, OSError):
                self.channel.send_message({"msg": "error", "error": why})
            self.channel.close()

    def commit(self) -> None:
        """Wait for the source's go. On failure the machine is closed, never run."""
        assert self.channel is not None and self.machine is not None
        enter_phase("migration.commit")
        try:
            reply = self.channel.recv_message(GO_TIMEOUT_S)
            if reply.get("msg") != "go":
                raise StreamFormatError(f"the source sent {reply!r} where 'go' was due")
        except KvmkitError as e:
            self.machine.close()
            self.channel.close()
            raise IncomingMigrationError(
                f"incoming migration was not committed: {e}; nothing was started here"
            ) from None

    def confirm_when_running(self) -> threading.Thread:
        """A thread that tells the source `running` once the vCPUs have started."""
        assert self.channel is not None and self.machine is not None
        channel, machine = self.channel, self.machine

        def confirm() -> None:
            while not machine.running and not machine.stopping.is_set():
                if self._aborted.wait(0.0002):
                    return
            with contextlib.suppress(KvmkitError, OSError):
                if machine.running:
                    channel.send_message({"msg": "running"})
                else:
                    channel.send_message({"msg": "error", "error": "the machine did not start"})
            channel.close()

        t = threading.Thread(target=confirm, name="kvmkit-migrate-confirm", daemon=True)
        t.start()
        return t

    def abort(self, why: str) -> None:
        """After the go, the machine could not be started (and never will be): tell the
        source, which may then carry on."""
        self._aborted.set()
        if self.channel is not None:
            with contextlib.suppress(KvmkitError, OSError):
                self.channel.send_message({"msg": "error", "error": why, "started": False})
            self.channel.close()

    def close(self) -> None:
        """Stop listening (a stale unix socket file is removed)."""
        for sock, address in zip(self.listeners, self.addresses, strict=False):
            sock.close()
            if address.kind == "unix":
                with contextlib.suppress(OSError):
                    os.unlink(address.path)
        self.listeners = []
