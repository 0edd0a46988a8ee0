import io
import os
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

import pytest

from kvmkit.guests.linux.build import linux_cache_root
from kvmkit.testing.harness import kvm_unavailable_reason
from kvmkit.testing.netns import NetLab


def skip_without_kvm(items: list, folder: str) -> None:
    """Mark the tests under `folder` skipped, with the reason, when KVM is unusable
    (for a folder's pytest_collection_modifyitems)."""
    reason = kvm_unavailable_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=f"needs KVM: {reason}")
    here = str(Path(folder))
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(skip)


def _children() -> set[int]:
    pids: set[int] = set()
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/children") as f:
                pids.update(int(p) for p in f.read().split())
        except OSError:
            continue
    return pids


@pytest.fixture(autouse=True)
def _no_kvmkit_left_running():
    """A test that fails half-way must not leave its kvmkit processes running (a guest
    spinning for the rest of the session slows every later test)."""
    before = _children()
    yield
    for pid in _children() - before:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"kvmkit" not in f.read():
                    continue
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (OSError, ChildProcessError):
            continue


@pytest.fixture(scope="module")
def lab():
    """A throwaway network namespace with a tap (kvmkit/testing/netns.py) for one test
    module's network tests; they skip with the reason where one cannot be made."""
    reason = NetLab.unavailable()
    if reason is not None:
        pytest.skip(reason)
    with NetLab.create() as lab:
        yield lab


@pytest.fixture(autouse=True, scope="session")
def _isolated_guest_cache(tmp_path_factory):
    """Build guests into a per-session cache so tests never depend on a stale one."""
    if "KVMKIT_CACHE_DIR" not in os.environ:
        # Guest programs rebuild per session; the test kernel (minutes to build) does not.
        os.environ.setdefault("KVMKIT_LINUX_CACHE_DIR", str(linux_cache_root()))
        os.environ["KVMKIT_CACHE_DIR"] = str(tmp_path_factory.mktemp("kvmkit-cache"))
    yield


# -- a Linux guest with virtio devices (tests/kvm/test_virtio_linux.py, tests/faults) ----
VIRTIO_DATA_BYTES = 64 << 20
VIRTIO_BASE_BYTES = 4 << 20
VIRTIO_BASE_SEED = 99


@dataclass
class VirtioSnapshot:
    path: Path
    data: Path  # the read-write drive "data" (/dev/vda), as at the snapshot
    base: Path  # the read-only drive "base" (/dev/vdb)


@pytest.fixture(scope="session")
def virtio_snapshot(test_kernel, tmp_path_factory) -> VirtioSnapshot:
    """The test kernel booted once with blk0 (data, rw, writeback), blk1 (base, ro),
    rng and balloon, snapshotted at its init's prompt."""
    from kvmkit.control.snapshots import take_snapshot
    from kvmkit.guests.linux.pattern import pattern
    from kvmkit.machine import build_for_boot
    from kvmkit.machine.resources import BalloonSpec, DriveSpec, EntropySpec
    from kvmkit.testing.linux import READY, LinuxGuest, kernel_resources

    d = tmp_path_factory.mktemp("virtio")
    data, base = d / "data.img", d / "base.img"
    with open(data, "wb") as f:
        f.truncate(VIRTIO_DATA_BYTES)
    base.write_bytes(pattern(VIRTIO_BASE_SEED, 0, VIRTIO_BASE_BYTES))
    resources = (
        kernel_resources(test_kernel)
        .with_drive(DriveSpec("data", str(data), serial="KVMKIT-DATA", cache="writeback"))
        .with_drive(DriveSpec("base", str(base), read_only=True))
        .with_entropy(EntropySpec())
        .with_balloon(BalloonSpec())
    )
    guest = LinuxGuest(build_for_boot(resources, console=io.BytesIO()))
    try:
        guest.wait_for(READY, 180)
        path = d / "virtio.snap"
        take_snapshot(guest.machine, path)
    finally:
        guest.close()
    return VirtioSnapshot(path, data, base)


@pytest.fixture
def virtio_disks(virtio_snapshot, tmp_path) -> dict[str, Path]:
    """This test's copies of the snapshot's drives, by drive id (the data drive was
    all zeros at the snapshot: a fresh sparse file of its size is its copy)."""
    out = {"data": tmp_path / "data.img", "base": tmp_path / "base.img"}
    with open(out["data"], "wb") as f:
        f.truncate(virtio_snapshot.data.stat().st_size)
    shutil.copyfile(virtio_snapshot.base, out["base"])
    out["base"].chmod(0o444)
    return out
