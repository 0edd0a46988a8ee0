"""Fault tests run against the real /dev/kvm; skipped with the reason without it."""

from pathlib import Path

from tests.conftest import skip_without_kvm


def pytest_collection_modifyitems(config, items):
    skip_without_kvm(items, str(Path(__file__).parent))
