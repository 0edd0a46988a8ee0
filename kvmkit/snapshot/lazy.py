"""Lazy restore: placeholder until the userfaultfd loader lands."""

from kvmkit.errors import KvmkitError
from kvmkit.memory import GuestMemory


class LazyRestore:
    def close(self) -> None:
        pass


def start_lazy_restore(snap: object, memory: GuestMemory) -> LazyRestore:
    raise KvmkitError("lazy restore is not available yet")
