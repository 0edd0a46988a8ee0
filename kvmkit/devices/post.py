"""Port 0x80, the POST code port: remembers the last byte written, does nothing else."""

POST_PORT = 0x80


class PostCode:
    name = "post-code"

    def __init__(self) -> None:
        self.last = 0
        self.writes = 0

    def read(self, offset: int, size: int) -> int:
        return self.last

    def write(self, offset: int, size: int, value: int) -> None:
        self.last = value & 0xFF
        self.writes += 1
