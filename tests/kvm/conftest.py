"""Tests here run against the real /dev/kvm with kvmkit's own guests.

Where /dev/kvm is missing they are skipped with the reason (shown by -ra).
"""

import os
from pathlib import Path

import pytest

from kvmkit.guests.build import build_image
from tests.conftest import skip_without_kvm

GUESTS = Path(__file__).parent / "guests"


def pytest_collection_modifyitems(config, items):
    skip_without_kvm(items, str(Path(__file__).parent))


@pytest.fixture
def vm(kvm):  # `kvm` comes from kvmkit's pytest plugin (kvmkit/testing/plugin.py)
    with kvm.create_vm() as v:
        yield v


def build_test_guest(name: str, load_addr: int = 0x100000) -> bytes:
    """Build one of the test-only guests in tests/kvm/guests/."""
    return build_image(GUESTS / f"{name}.S", load_addr)


def write_guest(tmp_path: Path, name: str, load_addr: int = 0x100000) -> str:
    path = tmp_path / f"{name}.bin"
    path.write_bytes(build_test_guest(name, load_addr))
    return str(path)


def open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}
