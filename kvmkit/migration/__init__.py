"""Live migration with pre-copy, guest_memfd memory included: the source streams
memory while the guest runs (dirty pages re-sent each iteration), pauses for the
last pages and the vCPU/VM/device state, and stops for good only once the target
says it is running. The stream is the snapshot format (kvmkit/snapshot/format.py)
with page sections; see source.py and target.py."""

from kvmkit.migration.source import MigrationError, MigrationReport, migrate
from kvmkit.migration.target import IncomingMigration

__all__ = ["IncomingMigration", "MigrationError", "MigrationReport", "migrate"]
