"""`Closeable`: a resource with `close()` that a `with` block closes."""

from types import TracebackType
from typing import Self


class Closeable:
    """A base for resources: `with x:` gives `x` and calls `x.close()` on the way out,
    however the block ended. A subclass defines `close()` (safe to call twice)."""

    __slots__ = ()

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
