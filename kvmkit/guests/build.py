"""Build kvmkit's guest programs from source with the system's gcc and binutils.

Binaries are never committed: each is assembled on first use and cached under
$KVMKIT_CACHE_DIR (default: $XDG_CACHE_HOME/kvmkit or ~/.cache/kvmkit), keyed by
a hash of its sources, so an edited source is rebuilt automatically.
"""

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvmkit.errors import KvmkitError

SRC_DIR = Path(__file__).parent / "src"
SHARED_SOURCES = ("kvmkit.h", "lib.S")
TOOLS = ("gcc", "ld", "objcopy")

LINKER_SCRIPT = """\
ENTRY(_start)
SECTIONS {{
  . = {load:#x};
  .text : {{ *(.text.start) *(.text .text.*) *(.rodata .rodata.*) *(.data .data.*) }}
  .bss : {{ *(.bss .bss.*) *(COMMON) }}
  /DISCARD/ : {{ *(.note*) *(.comment) *(.eh_frame*) }}
}}
"""


class GuestBuildError(KvmkitError):
    pass


@dataclass(frozen=True)
class GuestProgram:
    """A guest program: its source, the CPU mode it starts in, where it loads."""

    name: str
    source: Path
    mode: str  # "long" or "real"
    load_addr: int
    summary: str

    def build(self) -> bytes:
        return build_image(self.source, self.load_addr)


LONG_LOAD = 0x100000
REAL_LOAD = 0x1000

BUILTIN: dict[str, GuestProgram] = {
    g.name: g
    for g in (
        GuestProgram(
            "hello",
            SRC_DIR / "hello.S",
            "long",
            LONG_LOAD,
            "the default: banner, pattern over all free RAM, exit 0",
        ),
        GuestProgram(
            "memtest",
            SRC_DIR / "memtest.S",
            "long",
            LONG_LOAD,
            "each vCPU tests its share of RAM in parallel and reports",
        ),
        GuestProgram(
            "hello16",
            SRC_DIR / "hello16.S",
            "real",
            REAL_LOAD,
            "real mode: prints a line and exits 0",
        ),
        GuestProgram(
            "touch",
            SRC_DIR / "touch.S",
            "long",
            LONG_LOAD,
            "every vCPU writes one word per page of its share of RAM (first touch), exits 0",
        ),
        GuestProgram(
            "exitloop",
            SRC_DIR / "exitloop.S",
            "long",
            LONG_LOAD,
            "writes the POST port --guest-arg times (one exit each), then exits 0",
        ),
        GuestProgram(
            "counter",
            SRC_DIR / "counter.S",
            "long",
            LONG_LOAD,
            "each vCPU counts in memory and prints a running checksum; --guest-arg steps",
        ),
        GuestProgram(
            "dirtier",
            SRC_DIR / "dirtier.S",
            "long",
            LONG_LOAD,
            "writes memory at a set rate; --guest-arg pages/ms | MiB << 32 | rounds << 48",
        ),
        GuestProgram(
            "trap",
            SRC_DIR / "trap.S",
            "long",
            LONG_LOAD,
            "handles NMI, #UD, #GP, #PF and #MC, printing each; --guest-arg POST exits",
        ),
        GuestProgram(
            "echo",
            SRC_DIR / "echo.S",
            "long",
            LONG_LOAD,
            "echoes console input, taken by interrupt (IRQ 4 through the PIC); 'q' ends it",
        ),
    )
}


# Guests kvmkit uses internally (selftests); not listed by `kvmkit guests`.
INTERNAL: dict[str, GuestProgram] = {
    "discard_probe": GuestProgram(
        "discard_probe",
        SRC_DIR / "discard_probe.S",
        "long",
        LONG_LOAD,
        "writes a word, has the host discard its page, checks it reads zero",
    ),
    "virtio_hostile": GuestProgram(
        "virtio_hostile",
        SRC_DIR / "virtio_hostile.S",
        "long",
        LONG_LOAD,
        "a hostile virtio-mmio driver; --guest-arg picks the flaw (test_virtio_hostile.py)",
    ),
}


def find_program(name: str) -> GuestProgram | None:
    """A built-in or internal guest program by name."""
    return BUILTIN.get(name) or INTERNAL.get(name)


def cache_dir() -> Path:
    if env := os.environ.get("KVMKIT_CACHE_DIR"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kvmkit"


def _sha256(data: bytes) -> "Any":  # noqa: ANN401 (a hash object)
    """SHA-256 from CPython's own module where there is one: `hashlib` loads OpenSSL,
    3.5 MB of RSS in every run for a cache key."""
    import importlib

    for name in ("_sha256", "_sha2"):  # CPython 3.11; 3.12 and later
        try:
            return importlib.import_module(name).sha256(data)
        except ImportError:
            continue
    import hashlib

    return hashlib.sha256(data)


def _source_key(source: Path, load_addr: int) -> str:
    h = _sha256(f"v1 {load_addr:#x}\n".encode())
    for path in (source, *(SRC_DIR / s for s in SHARED_SOURCES)):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def build_image(source: Path, load_addr: int) -> bytes:
    """The flat binary for an assembly source (GNU as, may #include kvmkit.h and
    lib.S), linked to run at `load_addr`. Cached; rebuilt when a source changes."""
    source = Path(source)
    if not source.is_file():
        raise GuestBuildError(f"guest source {source} does not exist")
    out = cache_dir() / "guests" / f"{source.stem}-{_source_key(source, load_addr)}.bin"
    if out.is_file():
        return out.read_bytes()
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        raise GuestBuildError(
            f"building guest {source.stem!r} needs {', '.join(missing)}:"
            " install them (apt-get install gcc binutils)"
        )
    with tempfile.TemporaryDirectory(prefix="kvmkit-guest-") as tmp:
        t = Path(tmp)
        (t / "guest.ld").write_text(LINKER_SCRIPT.format(load=load_addr))
        steps = [
            [
                "gcc",
                "-c",
                "-x",
                "assembler-with-cpp",
                f"-I{SRC_DIR}",
                f"-I{source.parent}",
                "-o",
                str(t / "guest.o"),
                str(source),
            ],
            [
                "ld",
                "-nostdlib",
                "-static",
                "--build-id=none",
                "-T",
                str(t / "guest.ld"),
                "-o",
                str(t / "guest.elf"),
                str(t / "guest.o"),
            ],
            ["objcopy", "-O", "binary", str(t / "guest.elf"), str(t / "guest.bin")],
        ]
        for cmd in steps:
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                detail = (proc.stderr or proc.stdout).strip().splitlines()
                raise GuestBuildError(
                    f"building guest {source.stem!r} failed at {cmd[0]}: "
                    + (" | ".join(detail[:6]) or f"exit {proc.returncode}")
                )
        image = (t / "guest.bin").read_bytes()
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = out.with_suffix(f".tmp{os.getpid()}")
        staging.write_bytes(image)
        os.replace(staging, out)
    return image
