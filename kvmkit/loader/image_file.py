"""A kernel or initrd file read in bounded pieces.

Nothing is ever read past the size the file had when it was opened, and never more
at once than one chunk (or one header) asks for: a hostile or huge file costs at most
what the guest RAM it is copied into could hold.
"""

import io
import os
import stat
from pathlib import Path
from typing import Protocol

from kvmkit.closing import Closeable
from kvmkit.errors import ConfigError

CHUNK_BYTES = 1 << 20


class RamWriter(Protocol):
    def write(self, gpa: int, data: bytes | memoryview) -> None: ...


class ImageFile(Closeable):
    """An open file plus what to call it in messages ("kernel", "initrd")."""

    def __init__(self, name: str, what: str, stream: io.BufferedIOBase, size: int) -> None:
        self.name = name
        self.what = what
        self.stream = stream
        self.size = size

    @classmethod
    def open(cls, path: Path, what: str, expect: str) -> "ImageFile":
        """Open `path` for reading; `expect` names what the user should give instead
        ("a vmlinux or bzImage") when the file cannot be used."""
        try:  # O_NONBLOCK: opening a FIFO must not wait for a writer
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise ConfigError(
                f"cannot read {what} {path}: {e.strerror or e}; give the path of {expect}"
            ) from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise ConfigError(f"{what} {path} is not a regular file; give the path of {expect}")
        os.set_blocking(fd, True)
        return cls(str(path), what, os.fdopen(fd, "rb"), st.st_size)

    @classmethod
    def from_bytes(cls, name: str, what: str, data: bytes) -> "ImageFile":
        return cls(name, what, io.BytesIO(data), len(data))

    def close(self) -> None:
        self.stream.close()

    def truncated(self, part: str, offset: int, length: int) -> ConfigError:
        return ConfigError(
            f"{self.what} {self.name} is truncated: its {part} needs bytes"
            f" {offset:#x}-{offset + length:#x} but the file has {self.size:#x}; copy or build"
            " it again"
        )

    def check_range(self, part: str, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise self.truncated(part, offset, length)

    def read_at(self, part: str, offset: int, length: int) -> bytes:
        """Exactly `length` bytes at `offset`, or a ConfigError naming `part`."""
        self.check_range(part, offset, length)
        self.stream.seek(offset)
        data = self.stream.read(length)
        if len(data) != length:  # the file shrank after it was opened
            raise self.truncated(part, offset, length)
        return data

    def head(self, length: int) -> bytes:
        """Up to `length` bytes from the start (fewer if the file is shorter)."""
        self.stream.seek(0)
        return self.stream.read(min(length, self.size))

    def copy_to(self, ram: RamWriter, gpa: int, part: str, offset: int, length: int) -> None:
        """Copy file bytes [offset, offset+length) to guest RAM at `gpa`, a chunk at a time."""
        self.check_range(part, offset, length)
        self.stream.seek(offset)
        buf = bytearray(min(CHUNK_BYTES, length))
        view = memoryview(buf)
        done = 0
        while done < length:
            want = min(len(buf), length - done)
            got = self.stream.readinto(view[:want])
            if not got:
                raise self.truncated(part, offset, length)
            ram.write(gpa + done, view[:got])
            done += got


def zero_fill(ram: RamWriter, gpa: int, length: int) -> None:
    """Write `length` zero bytes at `gpa`, a chunk at a time."""
    zeros = memoryview(bytes(min(CHUNK_BYTES, length)))  # made when needed, not at import
    done = 0
    while done < length:
        n = min(len(zeros), length - done)
        ram.write(gpa + done, zeros[:n])
        done += n
