"""Hidden partial snapshot files (written where O_TMPFILE is not available): a save
removes those its directory holds from processes that no longer exist, and only those."""

import os
import subprocess

from kvmkit.snapshot.file import partial_path, remove_stale_partials


def test_stale_partial_files_of_live_processes_stay(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    names = {
        partial_path(tmp_path / "a.snap", dead.pid).name: False,  # removed
        partial_path(tmp_path / "b.snap", os.getpid()).name: True,  # ours: may be in use
        partial_path(tmp_path / "c.snap", 1).name: True,  # a live process
        ".d.snap.partial-x": True,  # not a PID
        "e.snap": True,
    }
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    removed = remove_stale_partials(tmp_path)
    assert [p.name for p in removed] == [n for n, keep in names.items() if not keep]
    assert sorted(os.listdir(tmp_path)) == sorted(n for n, keep in names.items() if keep)
