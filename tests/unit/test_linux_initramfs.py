import shutil
import stat
import subprocess

import pytest

from kvmkit.guests.linux.initramfs import (
    HEADER_SIZE,
    CpioFormatError,
    Entry,
    init_archive,
    parse_newc,
    write_newc,
)


def test_round_trip_keeps_names_modes_data_and_devices():
    entries = [
        Entry.directory("dev"),
        Entry.char_device("dev/console", 5, 1),
        Entry.file("init", b"\x7fELF" + bytes(range(256)) * 3, 0o755),
        Entry.file("a/b", b"x"),  # odd sizes exercise the 4-byte padding
        Entry.file("empty", b""),
    ]
    assert parse_newc(write_newc(entries)) == entries


def test_every_header_is_4_byte_aligned_and_the_archive_ends_with_the_trailer():
    data = write_newc([Entry.file("abc", b"12345"), Entry.file("de", b"1")])
    pos = 0
    names = []
    while True:
        assert pos % 4 == 0 and data[pos : pos + 6] == b"070701"
        size = int(data[pos + 54 : pos + 62], 16)
        namesize = int(data[pos + 94 : pos + 102], 16)
        names.append(data[pos + HEADER_SIZE : pos + HEADER_SIZE + namesize - 1].decode())
        pos += HEADER_SIZE + namesize
        pos += -pos % 4
        pos += size + (-size % 4)
        if names[-1] == "TRAILER!!!":
            break
    assert names == ["abc", "de", "TRAILER!!!"] and pos == len(data)


def test_same_entries_give_the_same_bytes():
    assert write_newc([Entry.file("x", b"1")]) == write_newc([Entry.file("x", b"1")])


def test_init_archive_has_init_console_and_mount_points():
    entries = {e.name: e for e in parse_newc(init_archive(b"binary"))}
    assert set(entries) == {"dev", "dev/console", "proc", "sys", "init"}
    init = entries["init"]
    assert stat.S_ISREG(init.mode) and init.mode & 0o777 == 0o755 and init.data == b"binary"
    console = entries["dev/console"]
    assert stat.S_ISCHR(console.mode) and (console.rdev_major, console.rdev_minor) == (5, 1)
    assert all(stat.S_ISDIR(entries[d].mode) for d in ("dev", "proc", "sys"))


@pytest.mark.skipif(shutil.which("cpio") is None, reason="no cpio tool to cross-check with")
def test_gnu_cpio_reads_the_archive(tmp_path):
    data = init_archive(b"#!/bin/true\n")
    listing = subprocess.run(
        ["cpio", "-itv"], input=data, capture_output=True, check=True
    ).stdout.decode()
    assert "dev/console" in listing and "init" in listing
    subprocess.run(
        ["cpio", "-id", "--no-absolute-filenames", "init"],
        input=data,
        cwd=tmp_path,
        capture_output=True,
        check=True,
    )
    assert (tmp_path / "init").read_bytes() == b"#!/bin/true\n"


@pytest.mark.parametrize(
    "entries, message",
    [
        ([Entry.file("x", b""), Entry.file("x", b"")], "appears twice"),
        ([Entry.file("../x", b"")], "not relative"),
        ([Entry.file("", b"")], "not relative"),
        ([Entry(name="d", mode=stat.S_IFDIR | 0o755, data=b"x")], "not a regular file"),
        ([Entry.char_device("c", 1 << 32, 0)], "does not fit in 32 bits"),
    ],
)
def test_bad_entries_are_refused_with_the_reason(entries, message):
    with pytest.raises(CpioFormatError, match=message):
        write_newc(entries)


def test_truncated_or_corrupt_archives_are_refused():
    data = write_newc([Entry.file("init", b"12345678")])
    with pytest.raises(CpioFormatError, match="truncated|past the end"):
        parse_newc(data[:-HEADER_SIZE])
    with pytest.raises(CpioFormatError, match="magic"):
        parse_newc(b"070707" + data[6:])
    with pytest.raises(CpioFormatError, match="past the end"):
        parse_newc(data[: HEADER_SIZE + 8])
