"""Helpers for migration tests: a source and a target kvmkit, each its own process."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from kvmkit.api.client import call

KVMKIT = [sys.executable, "-m", "kvmkit"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A kvmkit process with its stderr in a file."""

    def __init__(self, args: list[str], log: Path, prefix: list[str] | None = None) -> None:
        self.log = log
        self.file = open(log, "w")  # noqa: SIM115 (closed in wait)
        self.p = subprocess.Popen(
            [*(prefix or []), *KVMKIT, *args], stdout=self.file, stderr=self.file
        )

    def wait_for(self, text: str, timeout_s: float = 30) -> None:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if text in self.log.read_text():
                return
            if self.p.poll() is not None:
                raise AssertionError(f"process ended ({self.p.returncode}): {self.log.read_text()}")
            time.sleep(0.02)
        raise AssertionError(f"{text!r} not seen in {timeout_s} s: {self.log.read_text()}")

    def wait(self, timeout_s: float = 120) -> int:
        try:
            return self.p.wait(timeout_s)
        finally:
            self.file.close()

    @property
    def output(self) -> str:
        return self.log.read_text()

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGKILL)
        self.wait()


class Source(Proc):
    def __init__(
        self, tmp: Path, guest: str, arg: int, *extra: str, prefix: list[str] | None = None
    ) -> None:
        self.socket = str(tmp / "source.sock")
        self.console = tmp / "source.txt"
        super().__init__(
            [
                "run",
                "--guest",
                guest,
                "--guest-arg",
                str(arg),
                "--api-socket",
                self.socket,
                "--console",
                str(self.console),
                *extra,
            ],
            tmp / "source.err",
            prefix,
        )
        end = time.monotonic() + 30
        while not os.path.exists(self.socket):
            assert time.monotonic() < end and self.p.poll() is None, self.output
            time.sleep(0.01)

    def wait_for_console(self, text: str, timeout_s: float = 30) -> None:
        end = time.monotonic() + timeout_s
        while text not in self.console.read_text():
            assert time.monotonic() < end, f"{text!r} not on the console: {self.output}"
            assert self.p.poll() is None, self.output
            time.sleep(0.02)

    def state(self) -> str:
        return call(self.socket, "status")["state"]


class Target(Proc):
    def __init__(
        self, tmp: Path, listen: str, *extra: str, prefix: list[str] | None = None
    ) -> None:
        self.listen = listen
        self.console = tmp / "target.txt"
        super().__init__(
            ["migrate", "receive", "--listen", listen, "--console", str(self.console), *extra],
            tmp / "target.err",
            prefix,
        )
        self.wait_for("waiting for a migration")


def send(
    source: Source, to: str, *extra: str, prefix: list[str] | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            *(prefix or []),
            *KVMKIT,
            "migrate",
            "send",
            "--socket",
            source.socket,
            "--to",
            to,
            "--json",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )


def send_in_background(source: Source, to: str, *extra: str) -> subprocess.Popen:
    p = subprocess.Popen(
        [*KVMKIT, "migrate", "send", "--socket", source.socket, "--to", to, *extra],
        stderr=subprocess.PIPE,
        text=True,
    )
    return p


def report(p: subprocess.CompletedProcess) -> dict:
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)
