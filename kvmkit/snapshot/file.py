"""Snapshot files: written to an unnamed file in the target's directory (O_TMPFILE,
which the kernel reclaims if kvmkit dies), fsynced and linked into place, so a crash,
ENOSPC or EIO never leaves a file that looks complete, nor a stray one; read back with
every section verified before anything runs.

Where the file system has no O_TMPFILE, the file is written as `.NAME.partial-PID`
and renamed into place; a save removes such files left in its directory by processes
that no longer exist."""

import errno as errno_mod
import io
import os
import re
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvmkit.closing import Closeable
from kvmkit.errors import ConfigError, KvmkitError
from kvmkit.faults import inject
from kvmkit.records import encode
from kvmkit.snapshot.format import (
    END,
    FLAG_ZSTD,
    MEMORY,
    StreamFormatError,
    StreamReader,
    StreamWriter,
    section_label,
)
from kvmkit.snapshot.machine_state import (
    Capturable,
    ProgressFn,
    SavedMachine,
    expect_section,
    read_machine,
    write_machine,
)
from kvmkit.snapshot.memory_image import CHUNK_BYTES
from kvmkit.snapshot.model import MachineDescription


class SnapshotWriteError(KvmkitError):
    """Writing a snapshot failed; no file was left behind."""


@dataclass
class SnapshotReport:
    path: str
    file_bytes: int
    memory_bytes: int
    chunks: int
    method: str
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


class _FileSink:
    """Whole writes to a raw fd (os.write may write less than asked)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def write(self, data: bytes | memoryview) -> int:
        view = memoryview(data)
        while view:
            short = inject("snapshot.write")  # a planned short write moves half
            n = os.write(self.fd, view[: max(1, len(view) // 2)] if short else view)
            view = view[n:]
        return len(data)


def check_target(path: Path) -> None:
    """A snapshot file can be written at `path`: it is no directory, and its directory
    exists (checked before any work, by every writer of snapshot files)."""
    if path.is_dir():
        raise ConfigError(f"snapshot path {path} is a directory: give a file name")
    parent = path.absolute().parent
    if not parent.is_dir():
        raise ConfigError(
            f"snapshot directory {parent} does not exist: create it, or write the snapshot"
            " elsewhere"
        )


def write_failure_hint(err: int | None, directory: Path) -> str:
    """What to do about a snapshot write that failed with `err` in `directory`."""
    return {
        errno_mod.ENOSPC: f"free space on {directory} or write elsewhere",
        errno_mod.EDQUOT: "the disk quota is full: free space or write elsewhere",
        errno_mod.EACCES: f"kvmkit may not write in {directory}",
        errno_mod.EROFS: f"{directory} is on a read-only file system: write elsewhere"
        " or remount it read-write",
    }.get(err or 0, "check the file system")


_PARTIAL = re.compile(r"\.(?P<name>.+)\.partial-(?P<pid>[0-9]{1,10})")


def partial_path(target: Path, pid: int | None = None) -> Path:
    """Where a snapshot is written before it is complete, without O_TMPFILE."""
    return target.with_name(f".{target.name}.partial-{os.getpid() if pid is None else pid}")


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def remove_stale_partials(directory: Path) -> list[Path]:
    """Remove the `.NAME.partial-PID` files in `directory` (regular files of this user)
    whose process no longer exists: what a killed save left where O_TMPFILE was not
    available. Returns what was removed."""
    removed: list[Path] = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        match = _PARTIAL.fullmatch(entry.name)
        if match is None:
            continue
        pid = int(match["pid"])
        if pid <= 0 or pid == os.getpid() or _process_exists(pid):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
                continue
            os.unlink(entry.path)
        except OSError:
            continue
        removed.append(Path(entry.path))
    return removed


def _open_output(target: Path) -> tuple[int, Path | None]:
    """The fd to write, and the partial file's path (None: an unnamed O_TMPFILE file,
    linked in by `_publish`)."""
    if os.path.isdir("/proc/self/fd"):  # linking an O_TMPFILE file goes through it
        try:
            flags = os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC
            return os.open(target.parent, flags, 0o600), None
        except OSError as e:
            if e.errno not in (errno_mod.EOPNOTSUPP, errno_mod.EISDIR, errno_mod.EINVAL):
                raise
    tmp = partial_path(target)
    return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600), tmp


def _publish(fd: int, tmp: Path | None, target: Path) -> None:
    """Put the complete file at `target`, atomically: a reader sees the old file or the
    new one, never part of one. An unnamed file is linked straight to `target` when
    there is none yet, else under the partial name and renamed over it."""
    if tmp is None:
        try:
            _link_unnamed(fd, target)
            return
        except FileExistsError:
            tmp = partial_path(target)
            tmp.unlink(missing_ok=True)
            _link_unnamed(fd, tmp)
    os.replace(tmp, target)


def _link_unnamed(fd: int, path: Path) -> None:
    """linkat(/proc/self/fd/FD, path, AT_SYMLINK_FOLLOW), as open(2) describes for
    O_TMPFILE (a dir fd makes os.link call linkat, which follows the magic link, where
    plain link(2) would try to link the /proc symlink itself)."""
    fds = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.link(str(fd), path, src_dir_fd=fds, follow_symlinks=True)
    finally:
        os.close(fds)


def save(
    path: str | os.PathLike[str],
    machine: Capturable,
    compress_level: int | None = None,
    progress: ProgressFn | None = None,
) -> SnapshotReport:
    """Write `machine` (stopped) to `path` atomically."""
    target = Path(path)
    check_target(target)
    start = time.monotonic()
    remove_stale_partials(target.parent)
    fd, tmp = -1, None
    try:
        fd, tmp = _open_output(target)
        writer = StreamWriter(_FileSink(fd), compress_level)
        try:
            stats = write_machine(writer, machine, "snapshot", progress)
        finally:
            writer.close()
        os.fsync(fd)
        _publish(fd, tmp, target)
        os.close(fd)
        fd, tmp = -1, None
        try:
            _fsync_dir(target.parent)
        except OSError:
            _discard(-1, target)  # in place but perhaps not durable: as the message says
            raise
    except OSError as e:
        _discard(fd, tmp)
        name = errno_mod.errorcode.get(e.errno or 0, "error")
        hint = write_failure_hint(e.errno, target.parent)
        injected = f" [{e.filename}]" if str(e.filename).startswith("fault injected") else ""
        raise SnapshotWriteError(
            f"writing snapshot {target} failed: {os.strerror(e.errno or 0)} ({name}){injected};"
            f" no snapshot file was left, and the VM is unchanged; {hint}"
        ) from None
    except BaseException:
        _discard(fd, tmp)
        raise
    return SnapshotReport(
        str(target),
        writer.offset,
        stats.memory_bytes,
        stats.chunks,
        stats.method,
        time.monotonic() - start,
    )


def _discard(fd: int, tmp: Path | None) -> None:
    """Close and remove what was written (an unnamed file goes with its fd); this
    itself must not fail, on a read-only file system say."""
    if fd >= 0:
        try:
            os.close(fd)
        except OSError:
            pass
    if tmp is not None:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _ReadSource:
    def __init__(self, f: io.RawIOBase) -> None:
        self.f = f

    def readinto(self, buffer: memoryview) -> int | None:
        short = inject("snapshot.read")  # a planned short read fills half
        return self.f.readinto(buffer[: max(1, len(buffer) // 2)] if short else buffer)


class SnapshotFile(Closeable):
    """An open snapshot: `saved` holds everything but the memory, which `reader` is
    positioned to stream next. Use as a context manager."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:
            self.file: io.RawIOBase = open(self.path, "rb", buffering=0)  # noqa: SIM115
        except FileNotFoundError:
            raise ConfigError(f"snapshot {self.path} does not exist") from None
        except IsADirectoryError:
            raise ConfigError(
                f"snapshot {self.path} is a directory: give a snapshot file"
            ) from None
        except OSError as e:
            raise ConfigError(f"cannot open snapshot {self.path}: {e.strerror}") from None
        st = os.fstat(self.file.fileno())
        self.size_bytes = st.st_size
        self.reader = StreamReader(
            _ReadSource(self.file),
            f"snapshot {self.path}",
            size=st.st_size if stat.S_ISREG(st.st_mode) else None,  # not a pipe's 0
            kind="snapshot",
            keep_heads=True,
        )
        try:
            self.saved: SavedMachine = read_machine(self.reader)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self.reader.close()
        self.file.close()


def inspect(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The header and every section of a snapshot, with every checksum verified; a
    damaged file raises StreamFormatError naming the section."""
    with SnapshotFile(path) as snap:
        reader = snap.reader
        index = snap.saved.memory_index
        memory = {"chunks": 0, "bytes": 0, "stored_bytes": 0, "compressed_chunks": 0}
        scratch = memoryview(bytearray(min(CHUNK_BYTES, max((e.length for e in index), default=0))))
        for i, extent in enumerate(index):
            head = reader.next_section()
            if head.tag != MEMORY or head.raw_bytes != extent.length:
                raise StreamFormatError(
                    f"{reader.what}: {head.label}: expected memory chunk {i} of {len(index)}"
                    f" ({extent.length} bytes)"
                )
            reader.read_payload(head, into=scratch[: extent.length])
            memory["chunks"] += 1
            memory["bytes"] += head.raw_bytes
            memory["stored_bytes"] += head.stored_bytes
            memory["compressed_chunks"] += 1 if head.flags & FLAG_ZSTD else 0
        expect_section(reader, END, "end marker")
        sections = []
        first_chunk = next(h.index for h in reader.heads if h.tag == MEMORY) + 1
        for head in reader.heads:
            if first_chunk <= head.index < first_chunk + len(index):
                continue
            sections.append(
                {
                    "index": head.index,
                    "section": "memory index" if head.tag == MEMORY else section_label(head.tag),
                    "offset": head.offset,
                    "stored_bytes": head.stored_bytes,
                    "raw_bytes": head.raw_bytes,
                }
            )
        return {
            "path": str(path),
            "file_bytes": snap.size_bytes,
            "format_version": reader.version,
            "header": snap.saved.header,
            "machine": encode(snap.saved.description),
            "sections": sections,
            "memory": memory,
            "checksums": f"{reader.sections} sections and the header verified",
        }


@dataclass
class SnapshotFileSource:
    """A snapshot file as a builder's saved source (kvmkit.machine.builder.SavedSource):
    what it is, its header and machine description come from the file; a subclass says
    how guest memory is filled (`load`)."""

    snap: SnapshotFile

    @property
    def what(self) -> str:
        return f"snapshot {self.snap.path}"

    @property
    def header(self) -> dict[str, Any]:
        return self.snap.saved.header

    @property
    def description(self) -> MachineDescription:
        return self.snap.saved.description
