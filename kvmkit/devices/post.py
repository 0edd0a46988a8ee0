"""Port 0x80, the POST code port: remembers the last byte written, does nothing else.
Linux also writes it as its I/O delay."""

from dataclasses import dataclass, field

from kvmkit.records import U8, bounds

POST_PORT = 0x80


@dataclass(frozen=True)
class PostState:
    last: int = field(default=0, metadata=bounds(*U8))
    writes: int = field(default=0, metadata=bounds(0, None))


class PostCode:
    state_version = 1
    state_type = PostState

    def __init__(self, state: PostState | None = None, name: str = "post") -> None:
        self.name = name
        s = state or PostState()
        self.last = s.last
        self.writes = s.writes

    def read(self, offset: int, size: int) -> int:
        return self.last

    def write(self, offset: int, size: int, value: int) -> None:
        self.last = value & 0xFF
        self.writes += 1

    def save_state(self) -> PostState:
        return PostState(self.last, self.writes)
