"""Port 0x80, the POST code port: remembers the last byte written, does nothing else."""

POST_PORT = 0x80


class PostCode:
    name = "post-code"
    state_version = 1

    def __init__(self) -> None:
        self.last = 0
        self.writes = 0

    def read(self, offset: int, size: int) -> int:
        return self.last

    def write(self, offset: int, size: int, value: int) -> None:
        self.last = value & 0xFF
        self.writes += 1

    def save_state(self) -> dict[str, object]:
        return {"last": self.last, "writes": self.writes}

    def load_state(self, state: dict[str, object]) -> None:
        self.last = int(state["last"]) & 0xFF  # type: ignore[call-overload]
        self.writes = int(state["writes"])  # type: ignore[call-overload]
