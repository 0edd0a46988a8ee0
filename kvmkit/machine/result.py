"""How a run ended, and what it did."""

from dataclasses import dataclass, field

EXIT_OK = 0
EXIT_HOST_ERROR = 1
EXIT_USAGE = 2
EXIT_GUEST_CRASH = 3
EXIT_TIMEOUT = 124  # as timeout(1): run --timeout expired
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)
EXIT_BROKEN_PIPE = 141  # the reader of stdout went away (128 + SIGPIPE), as `| head`
EXIT_TERMINATED = 143  # SIGTERM (128 + SIGTERM)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread by kvmkit's handler: it ends a run, a restore
    or a receive the way Ctrl-C does (cleanly, with a summary), but says SIGTERM."""


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
