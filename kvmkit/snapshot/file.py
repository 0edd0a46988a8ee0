"""Snapshot files: written to a temporary file, fsynced, renamed into place, so a crash,
ENOSPC or EIO never leaves a file that looks complete; read back with every section
verified before anything runs."""

import errno as errno_mod
import io
import os
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from kvmkit.errors import ConfigError, KvmkitError
from kvmkit.faults import inject
from kvmkit.records import encode
from kvmkit.snapshot.format import (
    FLAG_ZSTD,
    MEMORY,
    StreamReader,
    StreamWriter,
    section_label,
)
from kvmkit.snapshot.machine_state import (
    Capturable,
    ProgressFn,
    SavedMachine,
    read_machine,
    write_machine,
)


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


def _check_target(path: Path) -> None:
    if path.is_dir():
        raise ConfigError(f"snapshot path {path} is a directory: give a file name")
    if not path.parent.is_dir():
        raise ConfigError(f"snapshot directory {path.parent} does not exist")


def save(
    path: str | os.PathLike[str],
    machine: Capturable,
    compress_level: int | None = None,
    progress: ProgressFn | None = None,
) -> SnapshotReport:
    """Write `machine` (stopped) to `path` atomically."""
    target = Path(path)
    _check_target(target)
    start = time.monotonic()
    tmp = target.with_name(f".{target.name}.partial-{os.getpid()}")
    fd = -1
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        writer = StreamWriter(_FileSink(fd), compress_level)
        try:
            stats = write_machine(writer, machine, "snapshot", progress)
        finally:
            writer.close()
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except OSError as e:
        _discard(fd, tmp)
        name = errno_mod.errorcode.get(e.errno or 0, "error")
        hint = {
            errno_mod.ENOSPC: f"free space on {target.parent} or write elsewhere",
            errno_mod.EDQUOT: "the disk quota is full: free space or write elsewhere",
            errno_mod.EACCES: f"kvmkit may not write in {target.parent}",
        }.get(e.errno or 0, "check the file system")
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


def _discard(fd: int, tmp: Path) -> None:
    if fd >= 0:
        os.close(fd)
    tmp.unlink(missing_ok=True)


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


class SnapshotFile:
    """An open snapshot: `saved` holds everything but the memory, which `reader` is
    positioned to stream next. Use as a context manager."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:
            self.file: io.RawIOBase = open(self.path, "rb", buffering=0)  # noqa: SIM115
        except FileNotFoundError:
            raise ConfigError(f"snapshot {self.path} does not exist") from None
        except OSError as e:
            raise ConfigError(f"cannot open snapshot {self.path}: {e.strerror}") from None
        self.size_bytes = os.fstat(self.file.fileno()).st_size
        self.reader = StreamReader(_ReadSource(self.file), f"snapshot {self.path}")
        try:
            self.saved: SavedMachine = read_machine(self.reader)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> "SnapshotFile":
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def inspect(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The header and every section of a snapshot, with every checksum verified; a
    damaged file raises StreamFormatError naming the section."""
    with SnapshotFile(path) as snap:
        reader = snap.reader
        while not reader.ended:
            reader.read_payload(reader.next_section())
        sections = []
        memory = {"chunks": 0, "bytes": 0, "stored_bytes": 0, "compressed_chunks": 0}
        index = next(h.index for h in reader.heads if h.tag == MEMORY)  # then the chunks
        for head in reader.heads:
            if head.tag == MEMORY and head.index != index:
                memory["chunks"] += 1
                memory["bytes"] += head.raw_bytes
                memory["stored_bytes"] += head.stored_bytes
                memory["compressed_chunks"] += 1 if head.flags & FLAG_ZSTD else 0
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
