"""Taking a snapshot of a running machine, and restoring one into a new machine.

A snapshot is one of the machine's operations (kvmkit/machine/operations.py): while
one is written, a migration, another snapshot, a user's pause or resume is refused,
and a `stop` cancels it. An existing file is replaced only when asked (`replace`), and
only if it is a kvmkit snapshot: anything else at the path is never overwritten.
"""

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from kvmkit.errors import ConfigError, KvmkitError
from kvmkit.faults import enter_phase
from kvmkit.kvm import KvmUnsupportedError
from kvmkit.machine.builder import RestoreOptions, build_from_saved
from kvmkit.machine.machine import Machine
from kvmkit.machine.operations import SNAPSHOT as SNAPSHOT_OPERATION
from kvmkit.machine.result import EXIT_HOST_ERROR
from kvmkit.memory import GuestMemory
from kvmkit.snapshot import file as snapshot_file
from kvmkit.snapshot.file import SnapshotFile, SnapshotFileSource, SnapshotReport, check_target
from kvmkit.snapshot.format import MAGIC
from kvmkit.snapshot.lazy import LazyRestore, start_lazy_restore
from kvmkit.snapshot.machine_state import ProgressFn, read_memory
from kvmkit.snapshot.model import MachineState

SNAPSHOT = "snapshot"  # the pause holder while a snapshot is written
NAME_MAX, PATH_MAX = 255, 4096  # Linux's limits on a file name and a path, in bytes


def take_snapshot(
    machine: Machine,
    path: str | os.PathLike[str],
    *,
    resume: bool = False,
    compress_level: int | None = None,
    progress: ProgressFn | None = None,
    replace: bool = True,
) -> SnapshotReport:
    """Pause, write a snapshot, then resume if `resume` (else the machine stays paused,
    held by the user, as `ctl pause` would). If writing fails or is cancelled (the
    machine stops, or `progress` raises: a client that went away), nothing new is
    left at `path`, a file that was there stays, and the machine is as it was
    (running if it was running). An existing `path` is refused unless `replace`, and
    is never replaced unless it is a kvmkit snapshot. Refused (OperationRefused)
    while another operation on the machine is in progress."""
    enter_phase("snapshot")
    if machine.memory is not None and machine.memory.hidden:
        raise KvmUnsupportedError(
            "snapshot", "guest memory is hidden from kvmkit, so it cannot be saved"
        )
    if not machine.alive:
        raise KvmkitError("the machine is not running, so there is nothing to snapshot")
    check_replaceable(path, replace)
    with machine.operations.begin(SNAPSHOT_OPERATION) as operation:

        def checked(done: int, total: int) -> None:
            operation.check()
            if progress is not None:
                progress(done, total)

        if machine.lazy is not None:
            machine.lazy.finish()  # a snapshot needs every page of the one it came from
        machine.pause(holder=SNAPSHOT)
        try:
            machine.console.flush(timeout_s=1.0)  # a stalled reader is given up on sooner
            operation.check()
            report = snapshot_file.save(path, machine, compress_level, checked)
            if not resume:
                machine.request_pause()  # stay paused, as the user's pause
        finally:
            machine.resume(SNAPSHOT)
    return report


def check_replaceable(path: str | os.PathLike[str], replace: bool) -> None:
    """Refuse a path no file can have (a NUL byte, a name over NAME_MAX bytes, the
    whole over PATH_MAX) before any work; refuse to write over an existing file unless
    `replace`, and over a file that is not a kvmkit snapshot at all (a typo'd path
    must never destroy a disk image)."""
    raw = os.fsencode(path)
    if b"\0" in raw:
        raise ConfigError(f"snapshot path {os.fsdecode(raw)!r} contains a NUL byte")
    longest = max((len(part) for part in raw.split(b"/")), default=0)
    if longest > NAME_MAX or len(raw) >= PATH_MAX:
        raise ConfigError(
            f"snapshot path {os.fsdecode(raw)[:80]}... is too long ({len(raw)} bytes, a name"
            f" of {longest}; the most is {PATH_MAX - 1} and {NAME_MAX} for a name)"
        )
    check_target(Path(path))  # no directory, and its directory exists
    if not os.path.lexists(path):
        return
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO, a device: never opened
            raise ConfigError(
                f"{path} exists and is not a regular file: kvmkit never replaces it;"
                " choose another path"
            )
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            start = os.read(fd, len(MAGIC))
        finally:
            os.close(fd)
    except OSError as e:
        raise ConfigError(
            f"{path} exists and cannot be read ({e.strerror}): choose another path"
        ) from None
    if start != MAGIC:
        raise ConfigError(
            f"{path} exists and is not a kvmkit snapshot: kvmkit never replaces it; remove"
            " it yourself or choose another path"
        )
    if not replace:
        raise ConfigError(
            f'{path} exists (a kvmkit snapshot): pass --force ("force": true) to replace it,'
            " or choose another path"
        )


@dataclass
class _SnapshotSource(SnapshotFileSource):
    """A snapshot file as a builder's saved source: memory eagerly or lazily."""

    lazy: bool
    prefetch: bool
    progress: ProgressFn | None
    loader: LazyRestore | None = None

    def load(self, memory: GuestMemory) -> MachineState:
        saved = self.snap.saved
        if self.lazy:
            self.loader = start_lazy_restore(self.snap, memory, self.prefetch)
        else:
            read_memory(self.snap.reader, memory, saved.memory_index, self.progress)
        return saved


def restore_snapshot(
    path: str | os.PathLike[str],
    *,
    memory_backend: str | None = None,
    console: str | None = None,
    console_stream: BinaryIO | None = None,
    lazy: bool = False,
    prefetch: bool = True,
    progress: ProgressFn | None = None,
    drive_paths: dict[str, str] | None = None,
    net_taps: dict[str, str] | None = None,
    vsock_uds: str | None = None,
) -> Machine:
    """A machine that continues the snapshot at `path` when `run()`. Every section is
    verified before the machine is built or any guest code runs (with `lazy`, memory
    chunks are verified as they load). `drive_paths` (drive id -> a backing file),
    `net_taps` (interface id -> tap) and `vsock_uds` attach the restored drives,
    network interfaces and vsock elsewhere."""
    enter_phase("restore")
    snap = SnapshotFile(path)
    if lazy and (memory_backend or snap.saved.description.backend) == "guest_memfd":
        snap.close()
        raise ConfigError(
            "--lazy fills memory through userfaultfd, which guest_memfd refuses (EINVAL on"
            " 6.18): restore with --memory-backend memfd --lazy, or without --lazy"
        )
    source = _SnapshotSource(snap, lazy, prefetch, progress)
    try:
        options = RestoreOptions(
            memory_backend,
            console,
            console_stream,
            drive_paths=drive_paths,
            net_taps=net_taps,
            vsock_uds=vsock_uds,
        )
        machine = build_from_saved(source, options)
    except BaseException:
        if source.loader is not None:
            source.loader.close()  # closes the file too
        else:
            snap.close()
        raise
    if source.loader is not None:
        loader = source.loader
        machine.lazy = loader  # the loader owns the file now
        loader.on_error = lambda why: machine.stop(EXIT_HOST_ERROR, why)
    else:
        snap.close()
    machine.restored_from = str(path)
    return machine
