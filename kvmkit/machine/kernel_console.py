"""What a Linux guest's kernel says on its console about how the run ends."""

import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class KernelConsole:
    """What a Linux kernel printed about how it ends, read line by line from the
    console: a panic's message, power-down and restart announcements, and when a
    bzImage's decompressor handed over ("Booting the kernel"). `on_panic_end` is called
    at the panic's last line: a kernel without `panic=` stops there for good, with
    nothing else to see of it (it keeps its vCPUs busy, so it never looks halted)."""

    started_at: float = field(default_factory=time.monotonic)
    panic: str | None = None
    power_down: bool = False
    restarting: bool = False
    decompressed_s: float | None = None
    first_line_s: float | None = None
    on_panic_end: Callable[[], None] = lambda: None

    def line(self, raw: bytes) -> None:
        text = raw.decode(errors="replace").rstrip("\r")
        if self.first_line_s is None and text.strip():
            self.first_line_s = time.monotonic() - self.started_at
        if self.panic is None and "Kernel panic - not syncing:" in text:
            self.panic = text.split("Kernel panic - not syncing:", 1)[1].strip()[:200]
        elif self.panic is not None and "---[ end Kernel panic" in text:
            self.on_panic_end()
        elif "reboot: Power down" in text or "Power off not available" in text:
            self.power_down = True
        elif "reboot: Restarting system" in text:
            self.restarting = True
        elif self.decompressed_s is None and "Booting the kernel" in text:
            self.decompressed_s = time.monotonic() - self.started_at
