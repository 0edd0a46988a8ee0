"""Write a KVM test in a few lines: guest code from an assembly string, a machine to
run it on, and what the run did (exits, console output, injected faults).

The pytest plugin (kvmkit/testing/plugin.py) wraps these as fixtures; `kvmkit
selftest` uses them directly.
"""

import io
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from kvmkit.faults import FaultPlan, active_plan, load_plan
from kvmkit.guests.build import LONG_LOAD, build_image
from kvmkit.machine import Machine, MachineConfig, build_for_boot
from kvmkit.machine.config import parse_size
from kvmkit.machine.result import EXIT_HOST_ERROR, RunResult

ASM_PROLOGUE = '#include "kvmkit.h"\nLONG_MODE_ENTRY\n'
ASM_EPILOGUE = '\n#include "lib.S"\n'
DEFAULT_TIMEOUT_S = 60.0


def kvm_unavailable_reason() -> str | None:
    """Why this process cannot use /dev/kvm, or None when it can."""
    if not os.path.exists("/dev/kvm"):
        return "/dev/kvm does not exist on this host"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is not readable and writable by this user"
    return None


def build_asm(source: str, workdir: str | Path, name: str = "guest") -> Path:
    """Assemble a long-mode guest from `source` (Intel syntax) into a flat binary in
    `workdir`; returns its path, ready for `guest=`.

    Unless `source` defines `_start` itself, it is the body of a program: it starts
    with RDI = boot info, RSI = vCPU index (also in r15 and r14), and may call the
    kvmkit guest library (puts, putdec, puthex, putc, exit, park; see
    kvmkit/guests/src/lib.S) and use the ABI names of kvmkit.h (PORT_COM1, PORT_POST,
    PORT_DEBUG_EXIT, BI_*)."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    text = source if "_start" in source else ASM_PROLOGUE + source + ASM_EPILOGUE
    src = workdir / f"{name}.S"
    src.write_text(text)
    out = workdir / f"{name}.bin"
    out.write_bytes(build_image(src, LONG_LOAD))
    return out


@dataclass
class GuestRun:
    """What a run did: `status` (kvmkit's exit status: 0 ok, 1 host error, 3 guest
    crash), `reason`, `console` text, `exits` by reason name, and the faults the plan
    injected (`injected`: one line per injection)."""

    result: RunResult
    console: str
    injected: list[str] = field(default_factory=list)

    @property
    def status(self) -> int:
        return self.result.status

    @property
    def reason(self) -> str:
        return self.result.reason

    @property
    def exits(self) -> dict[str, int]:
        return self.result.exits

    @property
    def lines(self) -> list[str]:
        return self.console.splitlines()


def machine_config(
    guest: str | Path = "hello",
    *,
    memory: str | int = "64M",
    vcpus: int = 1,
    memory_backend: str = "auto",
    arg: int = 0,
    irqchip: bool = True,
) -> MachineConfig:
    return MachineConfig(
        memory_bytes=parse_size(memory),
        vcpus=vcpus,
        memory_backend=memory_backend,
        guest=str(guest),
        guest_arg=arg,
        irqchip=irqchip,
    )


@contextmanager
def built_machine(guest: str | Path = "hello", **options: object) -> Iterator[Machine]:
    """A Machine for `guest` (a built-in name or a flat binary path), closed on exit;
    its console output collects in `machine.serial` (read it with `console_of`)."""
    config = machine_config(guest, **options)  # type: ignore[arg-type]
    with build_for_boot(config, console=io.BytesIO()) as machine:
        yield machine


def console_of(machine: Machine) -> str:
    machine.console.flush()
    out = machine.console.stream
    return out.getvalue().decode(errors="replace") if isinstance(out, io.BytesIO) else ""


def run_machine(machine: Machine, timeout_s: float = DEFAULT_TIMEOUT_S) -> RunResult:
    """machine.run(), stopped with status 1 and a clear reason after `timeout_s`."""
    timer = threading.Timer(
        timeout_s, machine.stop, (EXIT_HOST_ERROR, f"the guest ran for over {timeout_s:g} s")
    )
    timer.daemon = True
    timer.start()
    try:
        return machine.run()
    finally:
        timer.cancel()


def run_guest(
    guest: str | Path = "hello",
    *,
    faults: Sequence[str] | FaultPlan = (),
    timeout_s: float = DEFAULT_TIMEOUT_S,
    **options: object,
) -> GuestRun:
    """Build a machine for `guest`, run it to the end under the fault rules `faults`
    (WHERE:WHAT@WHEN strings, or a FaultPlan), and report. Options: memory ("64M"),
    vcpus (1), memory_backend ("auto"), arg (the guest's --guest-arg), irqchip."""
    plan = faults if isinstance(faults, FaultPlan) else load_plan(list(faults)) if faults else None
    with built_machine(guest, **options) as machine:
        with active_plan(plan) if plan is not None else nullcontext():
            result = run_machine(machine, timeout_s)
        injected = [
            f"{i.site} call {i.call}: {i.rule.describe()}" for i in (plan.log if plan else [])
        ]
        return GuestRun(result, console_of(machine), injected)
