"""Helpers for snapshot tests: run the counter guest in a thread, check its output
against the host-side model, rewrite a snapshot's header."""

import json
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

from kvmkit.guests.model import counter_lines
from kvmkit.machine import MachineConfig, build_for_boot
from kvmkit.machine.result import RunResult


def kvmkit_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kvmkit", *args], capture_output=True, text=True, timeout=timeout
    )


class Running:
    """A Machine running on a background thread."""

    def __init__(self, config: MachineConfig, setup: object = None) -> None:
        """`setup(machine)` runs before the vCPUs start."""
        self.machine = build_for_boot(config)
        if setup is not None:
            setup(self.machine)  # type: ignore[operator]
        self.result: RunResult | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        while not self.machine.running and self.thread.is_alive():
            time.sleep(0.001)

    def _run(self) -> None:
        self.result = self.machine.run()

    def finish(self, timeout_s: float = 60) -> RunResult:
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), "the machine did not finish"
        self.machine.close()
        assert self.result is not None
        return self.result

    def kill(self) -> None:
        self.machine.stop(0, "test over")
        self.finish()


def counter_config(
    console: Path, steps: int, vcpus: int = 1, backend: str = "guest_memfd", **kw: object
) -> MachineConfig:
    return MachineConfig(
        guest="counter",
        guest_arg=steps,
        vcpus=vcpus,
        memory_backend=backend,
        memory_bytes=64 << 20,
        console=str(console),
        **kw,  # type: ignore[arg-type]
    )


def assert_counter_output(text: str, vcpus: int, steps: int, context: str = "") -> None:
    """Every vCPU printed exactly its model sequence, from step 1 to `steps`."""
    lines = text.splitlines()
    for v in range(vcpus):
        got = [line for line in lines if line.startswith(f"cpu{v} ")]
        want = counter_lines(v, steps)
        if got != want:
            first = next(
                (i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b),
                min(len(got), len(want)),
            )
            raise AssertionError(
                f"{context}vCPU {v}: {len(got)} lines, want {len(want)}; first difference at"
                f" line {first}: got {got[first : first + 2]}, want {want[first : first + 2]}"
            )


def rewrite_header(path: Path, mutate: object, version: int | None = None) -> None:
    """Change a snapshot's JSON header (and/or format version), with a valid checksum."""
    data = bytearray(path.read_bytes())
    magic, old_version, length = struct.unpack_from("<8sII", data)
    header = json.loads(data[16 : 16 + length])
    mutate(header)  # type: ignore[operator]
    body = json.dumps(header, sort_keys=True).encode()
    ver = old_version if version is None else version
    fixed = struct.pack("<II", ver, len(body))
    crc = zlib.crc32(body, zlib.crc32(fixed))
    path.write_bytes(magic + fixed + body + struct.pack("<I", crc) + data[16 + length + 4 :])
