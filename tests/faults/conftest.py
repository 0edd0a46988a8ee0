"""Fault tests run against the real /dev/kvm; skipped with the reason without it."""

from pathlib import Path

import pytest

from tests.conftest import kvm_unavailable_reason


def pytest_collection_modifyitems(config, items):
    reason = kvm_unavailable_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=f"needs KVM: {reason}")
    here = str(Path(__file__).parent)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(skip)
