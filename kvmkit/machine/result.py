"""How a run ended, and what it did."""

from dataclasses import dataclass, field

EXIT_OK = 0
EXIT_HOST_ERROR = 1
EXIT_USAGE = 2
EXIT_GUEST_CRASH = 3
EXIT_INTERRUPTED = 130


@dataclass
class RunResult:
    """`status` is the process exit status kvmkit uses; `reason` says why in one line;
    `detail` holds any register dump."""

    status: int
    reason: str
    detail: str = ""
    wall_s: float = 0.0
    exits: dict[str, int] = field(default_factory=dict)
    vcpus: int = 0
    memory_bytes: int = 0
    backend: str = ""
    backend_reason: str = ""
    host_mapped_bytes: int = 0
    console_bytes: int = 0
    console_dropped: int = 0  # output the console's reader did not take in time
    populated_bytes: int = 0
    exposure: str = ""
    memory_notes: list[str] = field(default_factory=list)

    @property
    def total_exits(self) -> int:
        return sum(self.exits.values())
