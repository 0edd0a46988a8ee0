"""A writer (and reader) for the "newc" cpio format Linux unpacks as an initramfs.

Only what an initramfs needs: directories, regular files and device nodes, all
owned by root, mtime 0 (so the same inputs give the same bytes). The format is
described in the kernel's Documentation/driver-api/early-userspace/buffer-format.rst:
a 110-byte ASCII header ("070701" and 13 eight-digit hex fields), the NUL-terminated
name padded to 4 bytes, the data padded to 4 bytes; a "TRAILER!!!" entry ends it.
"""

import stat
from collections.abc import Iterable
from dataclasses import dataclass

from kvmkit.errors import KvmkitError

MAGIC = b"070701"
HEADER_SIZE = 110
TRAILER = "TRAILER!!!"
FIELDS = (
    "ino",
    "mode",
    "uid",
    "gid",
    "nlink",
    "mtime",
    "filesize",
    "devmajor",
    "devminor",
    "rdevmajor",
    "rdevminor",
    "namesize",
    "check",
)


class CpioFormatError(KvmkitError):
    pass


@dataclass(frozen=True)
class Entry:
    """One archive member: `name` is relative ("dev/console"), `mode` has the type bits."""

    name: str
    mode: int
    data: bytes = b""
    rdev_major: int = 0
    rdev_minor: int = 0

    @staticmethod
    def directory(name: str, perm: int = 0o755) -> "Entry":
        return Entry(name, stat.S_IFDIR | perm)

    @staticmethod
    def file(name: str, data: bytes, perm: int = 0o644) -> "Entry":
        return Entry(name, stat.S_IFREG | perm, data)

    @staticmethod
    def char_device(name: str, major: int, minor: int, perm: int = 0o600) -> "Entry":
        return Entry(name, stat.S_IFCHR | perm, b"", major, minor)


def _pad4(n: int) -> int:
    return (4 - n % 4) % 4


def _header(ino: int, entry: Entry, namesize: int) -> bytes:
    values = (
        ino,
        entry.mode,
        0,
        0,
        2 if stat.S_ISDIR(entry.mode) else 1,
        0,
        len(entry.data),
        0,
        0,
        entry.rdev_major,
        entry.rdev_minor,
        namesize,
        0,
    )
    for field, value in zip(FIELDS, values, strict=True):
        if not 0 <= value <= 0xFFFFFFFF:
            raise CpioFormatError(
                f"cpio entry {entry.name!r}: {field} {value} does not fit in 32 bits"
            )
    return MAGIC + b"".join(b"%08X" % v for v in values)


def write_newc(entries: Iterable[Entry]) -> bytes:
    """The archive holding `entries` in order, then the trailer."""
    out = bytearray()
    names: set[str] = set()
    for ino, entry in enumerate([*entries, Entry(TRAILER, 0)], start=1):
        name = entry.name.lstrip("/")
        if not name or "\0" in name or any(part == ".." for part in name.split("/")):
            raise CpioFormatError(f"cpio entry name {entry.name!r} is empty or not relative")
        if name in names:
            raise CpioFormatError(f"cpio entry {name!r} appears twice")
        names.add(name)
        if entry.data and not stat.S_ISREG(entry.mode):
            raise CpioFormatError(f"cpio entry {name!r} has data but is not a regular file")
        encoded = name.encode() + b"\0"
        out += _header(0 if name == TRAILER else ino, entry, len(encoded))
        out += encoded + b"\0" * _pad4(HEADER_SIZE + len(encoded))
        out += entry.data + b"\0" * _pad4(len(entry.data))
    return bytes(out)


def parse_newc(data: bytes) -> list[Entry]:
    """The entries of a newc archive (without the trailer); raises CpioFormatError."""
    entries: list[Entry] = []
    pos = 0
    while True:
        if pos + HEADER_SIZE > len(data):
            raise CpioFormatError(f"cpio archive truncated at offset {pos} (no trailer)")
        if data[pos : pos + 6] != MAGIC:
            raise CpioFormatError(f"cpio archive: no newc magic at offset {pos}")
        try:
            values = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        except ValueError:
            raise CpioFormatError(f"cpio archive: bad header at offset {pos}") from None
        fields = dict(zip(FIELDS, values, strict=True))
        name_start = pos + HEADER_SIZE
        name_end = name_start + fields["namesize"]
        if fields["namesize"] == 0 or name_end > len(data) or data[name_end - 1] != 0:
            raise CpioFormatError(f"cpio archive: bad name at offset {name_start}")
        name = data[name_start : name_end - 1].decode()
        data_start = name_end + _pad4(HEADER_SIZE + fields["namesize"])
        data_end = data_start + fields["filesize"]
        if data_end > len(data):
            raise CpioFormatError(f"cpio entry {name!r} runs past the end of the archive")
        if name == TRAILER:
            return entries
        entries.append(
            Entry(
                name,
                fields["mode"],
                bytes(data[data_start:data_end]),
                fields["rdevmajor"],
                fields["rdevminor"],
            )
        )
        pos = data_end + _pad4(fields["filesize"])


def init_archive(init: bytes) -> bytes:
    """The test kernel's initramfs: /init, mount points, and /dev/console for the
    kernel to open as init's stdin/stdout/stderr before devtmpfs is mounted."""
    return write_newc(
        [
            Entry.directory("dev"),
            Entry.char_device("dev/console", 5, 1),
            Entry.directory("proc"),
            Entry.directory("sys"),
            Entry.file("init", init, 0o755),
        ]
    )
