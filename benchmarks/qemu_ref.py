"""QEMU as the reference VMM in kvmkit's Linux benchmarks: the same test kernel, initrd
and command line on `qemu-system-x86_64 -enable-kvm -M microvm` (Debian's
qemu-system-x86), driven through QMP. Used by linux_boot.py, migration.py and
snapshot.py."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

BANNER = "kvmkit-init: ready"


def qemu_binary() -> str:
    path = shutil.which("qemu-system-x86_64")
    if path is None:
        sys.exit("QEMU is not installed: apt-get install qemu-system-x86")
    return path


def qemu_command(
    kernel: Path, initrd: Path, cmdline: str, mem_mib: int, vcpus: int = 1
) -> list[str]:
    return [
        qemu_binary(), "-enable-kvm", "-M", "microvm,rtc=on,acpi=off", "-cpu", "host",
        "-m", str(mem_mib), "-smp", str(vcpus), "-nodefaults", "-no-user-config",
        "-nographic", "-kernel", str(kernel), "-initrd", str(initrd), "-append", cmdline,
    ]  # fmt: skip


class Qemu:
    """A QEMU process with a QMP socket and its serial console in a file."""

    def __init__(self, base: list[str], tmp: Path, name: str, incoming: str | None = None):
        self.qmp_path = tmp / f"{name}.qmp"
        self.console = tmp / f"{name}.console"
        args = [*base, "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
                "-serial", f"file:{self.console}"]  # fmt: skip
        if incoming:
            args += ["-incoming", incoming]
        self.p = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE)  # fmt: skip
        deadline = time.monotonic() + 30
        while not self.qmp_path.exists():
            if self.p.poll() is not None or time.monotonic() > deadline:
                sys.exit(
                    f"QEMU did not start: {self.p.stderr.read().decode() if self.p.stderr else ''}"
                )
            time.sleep(0.02)
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(str(self.qmp_path))
        self.file = self.sock.makefile("rw")
        json.loads(self.file.readline())  # the greeting
        self.qmp("qmp_capabilities")

    def qmp(self, command: str, **arguments: object) -> dict:
        self.file.write(json.dumps({"execute": command, "arguments": arguments}) + "\n")
        self.file.flush()
        while True:
            reply = json.loads(self.file.readline())
            if "return" in reply or "error" in reply:
                if "error" in reply:
                    raise RuntimeError(f"QMP {command}: {reply['error']}")
                return reply["return"]

    def wait_console(self, text: str, timeout_s: float = 300) -> float:
        """Seconds until `text` is on the console."""
        start = time.monotonic()
        while True:
            if self.console.exists() and text in self.console.read_text(errors="replace"):
                return time.monotonic() - start
            if self.p.poll() is not None:
                sys.exit(f"QEMU ended before {text!r}")
            if time.monotonic() - start > timeout_s:
                sys.exit(f"{text!r} not on QEMU's console within {timeout_s} s")
            time.sleep(0.02)

    def migrate(self, uri: str, timeout_s: float = 300) -> dict:
        """Migrate to `uri` and wait; query-migrate's final answer (total-time and
        downtime, in ms)."""
        self.qmp("migrate", uri=uri)
        deadline = time.monotonic() + timeout_s
        while True:
            info = self.qmp("query-migrate")
            if info.get("status") in ("completed", "failed", "cancelled"):
                if info["status"] != "completed":
                    sys.exit(f"QEMU migration {info['status']}: {info}")
                return info
            if time.monotonic() > deadline:
                sys.exit("QEMU migration did not complete")
            time.sleep(0.005)

    def close(self) -> None:
        try:
            self.file.close()
            self.sock.close()
        finally:
            if self.p.poll() is None:
                self.p.kill()
            self.p.wait()
            for path in (self.qmp_path,):
                if path.exists():
                    os.unlink(path)
