"""Snapshot files on real file systems: a save killed mid-write leaves nothing behind
(O_TMPFILE), or, on a file system without O_TMPFILE (a FUSE mount), a partial file
that the next save in that directory removes; a read-only file system is named with
the fix; appended and truncated files are refused, naming where, eagerly and lazily."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvmkit.api.client import ApiCallError, call
from kvmkit.api.server import ApiServer
from kvmkit.control.snapshots import restore_snapshot, take_snapshot
from kvmkit.errors import KvmkitError
from kvmkit.snapshot.file import partial_path

from .snapshot_helpers import Running, assert_counter_output, counter_config

MIB = 1 << 20

SAVER = r"""
import sys, threading, time
from kvmkit.control.snapshots import take_snapshot
from kvmkit.machine import MachineConfig, build_for_boot
m = build_for_boot(MachineConfig(guest="counter", guest_arg=0, memory_backend="memfd",
                          memory_bytes=512 << 20, console="none"))
threading.Thread(target=m.run, daemon=True).start()
while not m.running:
    time.sleep(0.001)
m.pause()
block = bytes(range(256)) * 4096
for at in range(16 << 20, 400 << 20, 1 << 20):  # 384 MiB to save: long enough to kill
    m.memory.file_view(at, 1 << 20)[:] = block
print("saving", flush=True)
take_snapshot(m, sys.argv[1])
print("saved", flush=True)
"""


def _writing(pid: int, directory: Path) -> bool:
    """Whether `pid` holds a file open for writing in `directory` (an O_TMPFILE file
    reads as "DIR/#INODE (deleted)" in /proc)."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except FileNotFoundError:
        return False
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith(f"{directory}/") and (".partial-" in target or "/#" in target):
            return True
    return False


def kill_mid_save(directory: Path) -> int:
    """A process saving a snapshot into `directory`, SIGKILLed while it writes."""
    p = subprocess.Popen(
        [sys.executable, "-c", SAVER, str(directory / "vm.snap")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "saving", p.stderr
        end = time.monotonic() + 30
        while not _writing(p.pid, directory):
            assert time.monotonic() < end and p.poll() is None, "the save never started"
            time.sleep(0.002)
        time.sleep(0.05)
        p.send_signal(signal.SIGKILL)
    finally:
        p.wait(30)
    assert p.returncode == -signal.SIGKILL, p.stderr.read() if p.stderr else ""
    return p.pid


def everything_in(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


def test_a_save_killed_mid_write_leaves_no_file(tmp_path):
    for _ in range(2):
        kill_mid_save(tmp_path)
        assert everything_in(tmp_path) == []  # no vm.snap, no hidden partial file


@pytest.fixture
def fuse_dir(tmp_path):
    """A FUSE mount (bindfs) of a directory: a real file system without O_TMPFILE."""
    if shutil.which("bindfs") is None:
        pytest.skip("bindfs is not installed (apt-get install bindfs): no FUSE file system")
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    p = subprocess.run(["bindfs", str(src), str(mnt)], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount bindfs: {p.stderr.strip()}")
    try:
        fd = os.open(mnt, os.O_TMPFILE | os.O_WRONLY, 0o600)
        os.close(fd)
        pytest.skip("this FUSE mount offers O_TMPFILE: nothing to fall back from")
    except OSError:
        pass
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


def test_without_o_tmpfile_the_next_save_removes_what_a_killed_save_left(tmp_path, fuse_dir):
    pid = kill_mid_save(fuse_dir)
    left = everything_in(fuse_dir)
    assert left == [partial_path(fuse_dir / "vm.snap", pid).name], left
    run = Running(counter_config(tmp_path / "a.txt", 100000, backend="memfd"))
    try:
        take_snapshot(run.machine, fuse_dir / "other.snap")
    finally:
        run.kill()
    assert everything_in(fuse_dir) == ["other.snap"]


@pytest.fixture
def read_only_dir(tmp_path):
    mnt = tmp_path / "ro"
    mnt.mkdir()
    p = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    if p.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs (needs root): {p.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


def test_a_read_only_file_system_is_named_with_the_fix(tmp_path, read_only_dir):
    run = Running(counter_config(tmp_path / "a.txt", 100000))
    server = ApiServer(tmp_path / "vm.sock", run.machine).start()
    try:
        sock = str(tmp_path / "vm.sock")
        with pytest.raises(ApiCallError) as e:
            call(sock, "snapshot", {"path": str(read_only_dir / "vm.snap")})
        message = str(e.value)
        assert "internal error" not in message, message
        assert "Read-only file system (EROFS)" in message, message
        assert "no snapshot file was left, and the VM is unchanged" in message
        assert f"{read_only_dir} is on a read-only file system: write elsewhere" in message
        assert call(sock, "status")["state"] == "running"
    finally:
        server.close()
        run.kill()


# -- damaged files, eager and lazy -----------------------------------------------------------
@pytest.fixture(scope="module")
def memfd_snapshot(tmp_path_factory):
    d = tmp_path_factory.mktemp("memfd")
    run = Running(counter_config(d / "a.txt", 100000, backend="memfd"))
    time.sleep(0.1)
    run.machine.memory.file_view(16 * MIB, 8 * MIB)[:] = b"\x5a" * (8 * MIB)  # 2+ chunks
    take_snapshot(run.machine, d / "m.snap")
    run.kill()
    return (d / "m.snap").read_bytes()


@pytest.mark.parametrize("lazy", [False, True])
def test_a_truncated_file_is_named_at_its_real_end_eagerly_and_lazily(
    tmp_path, memfd_snapshot, lazy
):
    size = len(memfd_snapshot)
    for cut in (size // 2, size - 5 * MIB, size - 3):
        path = tmp_path / f"cut{cut}.snap"
        path.write_bytes(memfd_snapshot[:cut])
        with pytest.raises(KvmkitError) as e:
            restore_snapshot(path, lazy=lazy, console="none")
        assert f"is truncated: it ends at byte {cut}, inside section" in str(e.value), str(e.value)


@pytest.mark.parametrize("lazy", [False, True])
def test_an_appended_file_is_refused_eagerly_and_lazily(tmp_path, memfd_snapshot, lazy):
    path = tmp_path / "appended.snap"
    path.write_bytes(memfd_snapshot + b"\n# a note\n")
    with pytest.raises(KvmkitError, match="10 bytes after the end marker: the file was appended"):
        restore_snapshot(path, lazy=lazy, console="none")


def test_a_compressed_snapshot_restores_lazily(tmp_path):
    """Compressed chunks have no fixed positions: the lazy restore walks their heads
    (each checked against the file) and its two loaders decompress at once."""
    pytest.importorskip("zstandard")
    steps = 400
    run = Running(counter_config(tmp_path / "a.txt", steps, vcpus=2, backend="memfd"))
    time.sleep(0.1)
    run.machine.memory.file_view(16 * MIB, 8 * MIB)[:] = bytes(range(256)) * (32 * 1024)
    take_snapshot(run.machine, tmp_path / "z.snap", compress_level=3)
    run.kill()
    m = restore_snapshot(tmp_path / "z.snap", lazy=True, console=str(tmp_path / "b.txt"))
    with m:
        assert m.run().status == 0
        m.lazy.wait(30)
        assert bytes(m.memory.file_view(16 * MIB, 8 * MIB)) == bytes(range(256)) * (32 * 1024)
    text = (tmp_path / "a.txt").read_text() + (tmp_path / "b.txt").read_text()
    assert_counter_output(text, 2, steps)
