"""Firecracker-style snapshots: the VM state in one file, guest memory in another.

- `snapshot_path` is a kvmkit state stream (the format of kvmkit/snapshot/, header
  "memory": "separate") with the machine description, the VM, vCPU and device
  sections and the memory index (which ranges of memory were populated), but no
  memory chunks: `kvmkit snapshot restore` of it alone stops at the first missing
  chunk, so it never runs a guest without its memory.
- `mem_file_path` is a raw image of guest memory, as Firecracker writes it: byte N of
  the file is byte N of the memory backing (guest-physical layout in
  `description.regions`: slot, gpa, size, offset into this file), sparse where the
  guest never wrote.

Both files are written under temporary names in their directories and renamed
into place, so a failure leaves neither. kvmkit's own single-file snapshot
(`kvmkit snapshot save`, the NDJSON API's "snapshot") is the alternative that keeps
everything in one verified file.
"""

import contextlib
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvmkit.errors import ConfigError, KvmkitError
from kvmkit.kvm import KvmUnsupportedError
from kvmkit.machine.machine import Machine
from kvmkit.memory import GuestMemory
from kvmkit.memory.layout import PAGE_SIZE
from kvmkit.memory.userfault import Userfaultfd
from kvmkit.snapshot.file import (
    SnapshotFile,
    SnapshotFileSource,
    check_target,
    partial_path,
    write_failure_hint,
)
from kvmkit.snapshot.format import MACHINE, MEMORY, StreamWriter, pack_json
from kvmkit.snapshot.machine_state import capture_state, header_for, write_state
from kvmkit.snapshot.memory_image import Extent, chunked, pack_index
from kvmkit.snapshot.model import MachineDescription, MachineState

SEPARATE = "separate"  # the header's "memory" in a state file


def _temp_for(path: Path) -> Path:
    check_target(path)
    return partial_path(path)


def save_split(machine: Machine, snapshot_path: str, mem_file_path: str) -> dict[str, Any]:
    """Write a stopped (paused) machine's state to `snapshot_path` and its memory to
    `mem_file_path`; return sizes for the log."""
    memory = machine.memory
    assert memory is not None
    state_target, mem_target = Path(snapshot_path), Path(mem_file_path)
    if state_target.resolve() == mem_target.resolve():
        raise ConfigError("snapshot_path and mem_file_path name the same file: give two")
    state_tmp, mem_tmp = _temp_for(state_target), _temp_for(mem_target)
    try:
        captured = capture_state(machine)
        extents, _method = memory.populated_extents()
        chunks = chunked(extents)
        _write_memory(memory, chunks, mem_tmp)
        with open(state_tmp, "wb") as f:
            writer = StreamWriter(f)
            header = header_for(machine, "snapshot", captured.description, captured.items)
            header["memory"] = SEPARATE
            writer.write_header(header)
            writer.write_section(MACHINE, [pack_json(_encode(captured.description))])
            write_state(writer, captured)
            writer.write_section(MEMORY, [pack_index(chunks)])
            writer.end()
            writer.close()
            f.flush()
            os.fsync(f.fileno())
        os.replace(mem_tmp, mem_target)
        os.replace(state_tmp, state_target)
    except OSError as e:
        where = state_target if str(e.filename or "") == str(state_tmp) else mem_target
        raise KvmkitError(
            f"writing the snapshot failed: {e.strerror} ({where}); nothing was left, and the"
            f" VM is unchanged; {write_failure_hint(e.errno, where.absolute().parent)}"
        ) from None
    finally:
        for tmp in (state_tmp, mem_tmp):
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
    return {
        "memory_bytes": memory.size_bytes,
        "populated_bytes": sum(c.length for c in chunks),
    }


def _encode(description: MachineDescription) -> Any:
    from kvmkit.records import encode

    return encode(description)


def _write_memory(memory: GuestMemory, chunks: list[Extent], path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, memory.size_bytes)
        for c in chunks:
            view = memory.file_view(c.offset, c.length)
            done = 0
            while done < c.length:
                done += os.pwrite(fd, view[done:], c.offset + done)
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class SplitSource(SnapshotFileSource):
    """A state file plus a raw memory file, as a builder's saved source."""

    mem_path: str

    def load(self, memory: GuestMemory) -> MachineState:
        """Copy the populated ranges of the raw memory file into guest memory."""
        saved = self.snap.saved
        try:
            fd = os.open(self.mem_path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise ConfigError(f"memory file {self.mem_path}: {e.strerror}") from None
        try:
            size = os.fstat(fd).st_size
            if size != memory.size_bytes:
                raise ConfigError(
                    f"memory file {self.mem_path} is {size} bytes; the snapshot's guest has"
                    f" {memory.size_bytes}: give the mem_file_path written with this snapshot"
                )
            for c in saved.memory_index:
                view = memory.file_view(c.offset, c.length)
                done = 0
                while done < c.length:
                    n = os.preadv(fd, [view[done:]], c.offset + done)
                    if n <= 0:
                        raise KvmkitError(f"memory file {self.mem_path} ended early")
                    done += n
        finally:
            os.close(fd)
        return saved


class HandlerMemory:
    """Guest memory a page-fault handler serves (Firecracker's Uffd backend): kvmkit
    keeps the userfaultfd open for the machine's life and never fills a page itself."""

    def __init__(self, uffd: Userfaultfd, handler: str) -> None:
        self.uffd = uffd
        self.handler = handler

    def finish(self) -> None:
        raise KvmkitError(
            f"guest memory is served on demand by the page-fault handler at {self.handler}:"
            " kvmkit cannot save pages it has not been given; restore with the File backend"
            " to snapshot again"
        )

    def close(self) -> None:
        self.uffd.close()


@dataclass
class UffdSource(SplitSource):
    """Firecracker's Uffd backend: guest memory registered with a userfaultfd, which is
    sent with the regions (JSON) to the page-fault handler listening at `mem_path`; the
    handler fills pages from the memory file as the guest touches them."""

    served: HandlerMemory | None = None

    def load(self, memory: GuestMemory) -> MachineState:
        window = memory.mappings.covering(0, memory.size_bytes)
        if window is None:
            raise KvmkitError("the Uffd backend needs guest memory mapped in kvmkit")
        uffd = Userfaultfd()
        try:
            try:
                uffd.register(window.addr, window.size)
            except OSError as e:
                raise KvmUnsupportedError(
                    "mem_backend Uffd",
                    f"userfaultfd cannot register {memory.backend_name} memory here"
                    f" ({e.strerror}): use kvmkit_memory_backend memfd, or the File backend",
                ) from None
            regions = [
                {
                    "base_host_virt_addr": window.addr + r.offset,
                    "size": r.size,
                    "offset": r.offset,
                    "page_size": PAGE_SIZE,
                    "page_size_kib": PAGE_SIZE,  # Firecracker's deprecated name, in bytes too
                }
                for r in memory.regions
            ]
            _send_to_handler(self.mem_path, json.dumps(regions).encode(), uffd.fd)
        except BaseException:
            uffd.close()
            raise
        self.served = HandlerMemory(uffd, self.mem_path)
        return self.snap.saved


def _send_to_handler(path: str, message: bytes, fd: int) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(10.0)
    try:
        try:
            sock.connect(path)
        except OSError as e:
            raise ConfigError(
                f"mem_backend Uffd: cannot reach the page-fault handler at {path}: {e.strerror}"
                " (start it first; it listens on a Unix stream socket)"
            ) from None
        try:
            socket.send_fds(sock, [message], [fd])
        except OSError as e:
            raise KvmkitError(
                f"mem_backend Uffd: sending the regions to {path} failed: {e.strerror}"
            ) from None
    finally:
        sock.close()


def open_state(snapshot_path: str) -> SnapshotFile:
    """The state file, verified; one written by kvmkit's single-file snapshot is refused
    (it carries its memory itself: restore it with 'kvmkit snapshot restore')."""
    snap = SnapshotFile(snapshot_path)
    if snap.saved.header.get("memory") != SEPARATE:
        snap.close()
        raise ConfigError(
            f"{snapshot_path} is a kvmkit single-file snapshot (memory inside): restore it with"
            " 'kvmkit snapshot restore', or take one with PUT /snapshot/create"
        )
    return snap
