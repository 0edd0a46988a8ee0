"""Linux guests at the speed of a snapshot: boot the project's test kernel once,
snapshot it at its init's prompt, and restore that snapshot for each test.

A boot costs ~10 s of emulated kernel on a PVM host; a restore costs milliseconds.
The test kernel's init (kvmkit/guests/linux/init/init.c) prints
`kvmkit-init: ready cpus=<n>`, then runs each line it reads from the serial console
and ends each command's output with `kvmkit-init: done rc=<n>`.

    guest = boot_test_kernel(kernel)             # or restore_guest(snapshot_path)
    result = guest.command("cpus")               # CommandResult(lines=["cpus=1"], rc=0)
    guest.send("poweroff"); run = guest.finish() # RunResult: status 0, "guest powered off"

The pytest plugin wraps this as the `test_kernel`, `linux_snapshot` (session) and
`linux_guest` fixtures.
"""

import io
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from kvmkit.control.snapshots import restore_snapshot, take_snapshot
from kvmkit.errors import KvmkitError
from kvmkit.guests.linux.build import TestKernel
from kvmkit.machine import Machine, build_for_boot
from kvmkit.machine.config import parse_size
from kvmkit.machine.resources import ConsoleSpec, LinuxBoot, MachineSpec, VmResources
from kvmkit.machine.result import EXIT_HOST_ERROR, RunResult

READY = "kvmkit-init: ready cpus="
DONE_RE = re.compile(r"^kvmkit-init: done rc=(-?\d+)$")
BOOT_TIMEOUT_S = 180.0
COMMAND_TIMEOUT_S = 120.0


class GuestTimeout(KvmkitError):
    """The guest did not print what was expected in time."""


@dataclass
class CommandResult:
    """A test-init command's output lines (without the done line) and its rc."""

    lines: list[str]
    rc: int

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def value(self, key: str) -> str:
        """`key=value` from the output (the init reports results that way)."""
        for line in self.lines:
            for word in line.split():
                if word.startswith(key + "="):
                    return word.split("=", 1)[1]
        raise KeyError(f"{key}= not in the output: {self.text!r}")


class LinuxGuest:
    """A running test-kernel guest: its machine on a thread, its console line by line,
    commands sent over the serial console."""

    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        self.lines: list[str] = []
        self._seen = 0  # lines consumed by wait_for / command
        self._cond = threading.Condition()
        machine.console.line_watchers.append(self._line)
        self.results: list[RunResult] = []
        self.thread = threading.Thread(target=self._run, name="linux-guest", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.results.append(self.machine.run())
        finally:
            with self._cond:
                self._cond.notify_all()

    def _line(self, raw: bytes) -> None:
        with self._cond:
            self.lines.append(raw.decode(errors="replace").rstrip("\r"))
            self._cond.notify_all()

    @property
    def console(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def wait_for(self, pattern: str | re.Pattern[str], timeout_s: float = 60.0) -> str:
        """The next line (after those already consumed) matching `pattern` (a substring
        or a regular expression); GuestTimeout if none comes in time."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                for i in range(self._seen, len(self.lines)):
                    line = self.lines[i]
                    hit = (
                        pattern.search(line) if isinstance(pattern, re.Pattern) else pattern in line
                    )
                    if hit:
                        self._seen = i + 1
                        return line
                if not self.thread.is_alive():
                    reason = self.results[0].reason if self.results else "no result"
                    raise GuestTimeout(f"the guest ended ({reason}) before {pattern!r}")
                left = deadline - time.monotonic()
                if left <= 0:
                    tail = "\n".join(self.lines[-10:])
                    raise GuestTimeout(
                        f"{pattern!r} not seen in {timeout_s:g} s; last lines:\n{tail}"
                    )
                self._cond.wait(left)

    def send(self, line: str) -> None:
        """One line of input to the init (it must end up read: the UART paces it)."""
        data = (line + "\n").encode()
        while data:
            data = data[self.machine.serial.feed(data) :]
            if data:
                time.sleep(0.01)

    def command(self, line: str, timeout_s: float = COMMAND_TIMEOUT_S) -> CommandResult:
        """Run one init command; its output lines and rc."""
        with self._cond:
            start = len(self.lines)
            self._seen = start
        self.send(line)
        done = self.wait_for(DONE_RE, timeout_s)
        with self._cond:
            end = self.lines.index(done, start)
            out = self.lines[start:end]
        match = DONE_RE.match(done)
        assert match is not None
        return CommandResult(out, int(match.group(1)))

    def finish(self, timeout_s: float = 60.0) -> RunResult:
        """Wait for the run to end (after poweroff, say) and return its result."""
        self.thread.join(timeout_s)
        if self.thread.is_alive():
            self.machine.stop(EXIT_HOST_ERROR, f"the guest did not end within {timeout_s:g} s")
            self.thread.join(10)
        return self.results[0]

    def close(self) -> None:
        if self.thread.is_alive():
            self.machine.stop(0, "closed by the test")
            self.thread.join(10)
        self.machine.close()


def kernel_resources(
    kernel: TestKernel,
    *,
    vcpus: int = 1,
    memory: str = "128M",
    memory_backend: str = "auto",
    cmdline: str = "",
) -> VmResources:
    """Resources that boot the test kernel with its recommended command line plus
    `cmdline`."""
    boot = LinuxBoot(
        str(kernel.vmlinux), str(kernel.initramfs), f"{kernel.cmdline} {cmdline}".strip()
    )
    spec = MachineSpec(vcpus=vcpus, memory_bytes=parse_size(memory), memory_backend=memory_backend)
    return VmResources(machine=spec, boot=boot, console=ConsoleSpec("none"))


def boot_test_kernel(kernel: TestKernel, **options: object) -> tuple[LinuxGuest, int]:
    """Boot the test kernel (options as `kernel_resources`) to its init's banner;
    the guest and the CPU count the init reported."""
    guest = LinuxGuest(
        build_for_boot(kernel_resources(kernel, **options), console=io.BytesIO())  # type: ignore[arg-type]
    )
    try:
        banner = guest.wait_for(READY, BOOT_TIMEOUT_S)
    except BaseException:
        guest.close()
        raise
    return guest, int(banner.rsplit("=", 1)[1])


def snapshot_at_prompt(guest: LinuxGuest, path: str | Path) -> Path:
    """Snapshot a guest sitting at its init's prompt, then stop it."""
    take_snapshot(guest.machine, path)
    guest.close()
    return Path(path)


def restore_guest(path: str | Path, **options: object) -> LinuxGuest:
    """A guest restored from a snapshot, running (options as `restore_snapshot`)."""
    return LinuxGuest(restore_snapshot(path, console_stream=io.BytesIO(), **options))  # type: ignore[arg-type]
