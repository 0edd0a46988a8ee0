import os
from pathlib import Path

import pytest

from kvmkit.guests.linux.build import linux_cache_root
from kvmkit.testing.harness import kvm_unavailable_reason


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


@pytest.fixture(autouse=True, scope="session")
def _isolated_guest_cache(tmp_path_factory):
    """Build guests into a per-session cache so tests never depend on a stale one."""
    if "KVMKIT_CACHE_DIR" not in os.environ:
        # Guest programs rebuild per session; the test kernel (minutes to build) does not.
        os.environ.setdefault("KVMKIT_LINUX_CACHE_DIR", str(linux_cache_root()))
        os.environ["KVMKIT_CACHE_DIR"] = str(tmp_path_factory.mktemp("kvmkit-cache"))
    yield
