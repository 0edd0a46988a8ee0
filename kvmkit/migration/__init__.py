"""Live migration with pre-copy, guest_memfd memory included: the source streams
memory while the guest runs (dirty pages re-sent each iteration), pauses for the
last pages and the vCPU/VM/device state, and stops for good only once the target
says it is running. The stream is the snapshot format (kvmkit/snapshot/format.py)
with page sections; see source.py and target.py."""

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvmkit.migration.source import MigrationError, MigrationReport, migrate
    from kvmkit.migration.target import IncomingMigration

__all__ = ["IncomingMigration", "MigrationError", "MigrationReport", "migrate"]
_WHERE = {
    "IncomingMigration": "target",
    "MigrationError": "source",
    "MigrationReport": "source",
    "migrate": "source",
}


def __getattr__(name: str) -> Any:  # noqa: ANN401
    """Load the source and target on first use: a run that never migrates (and
    `kvmkit.migration.address`, which every run's parser uses) does not pay for them."""
    if name in _WHERE:
        return getattr(importlib.import_module(f"kvmkit.migration.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'kvmkit.migration' has no attribute {name!r}")
