"""Build kvmkit's Linux test kernel, initramfs and init, once, into the cache.

The kernel is Debian's linux-source-6.12 configured as `make tinyconfig` plus
config.fragment, with the small patches in patches/ that a PVM host needs; the
initramfs holds the static test init built from init/. Everything lands in
$KVMKIT_CACHE_DIR/linux/<hash>/ (see kvmkit.guests.build.cache_dir), where the hash
covers every input: the fragment, the patches, the init sources, the initramfs
layout, BUILDER_VERSION and the identity of the source tarball. A build works in
<hash>.work/ (the extracted source, kept across failed attempts so a rebuild is
incremental) and appears by one rename; the source is then deleted unless asked.
"""

import fcntl
import json
import os
import shutil
import subprocess
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from kvmkit.errors import KvmkitError
from kvmkit.guests.build import cache_dir
from kvmkit.guests.linux.initramfs import init_archive

# Bump when the build steps change in a way that changes the output.
BUILDER_VERSION = 1

HERE = Path(__file__).parent
FRAGMENT_NAME = "config.fragment"
PATCH_DIR_NAME = "patches"
INIT_DIR_NAME = "init"

SOURCE_PACKAGE = "linux-source-6.12"
DEFAULT_TARBALL = Path("/usr/src/linux-source-6.12.tar.xz")
TARBALL_ENV = "KVMKIT_LINUX_SOURCE"
APT_PACKAGES = (
    SOURCE_PACKAGE,
    "bc",
    "flex",
    "bison",
    "libelf-dev",
    "gcc",
    "make",
    "patch",
    "xz-utils",
)
TOOLS = ("gcc", "make", "bc", "flex", "bison", "patch", "tar", "xz", "perl")
LIBELF_HEADER = Path("/usr/include/gelf.h")

ARCH = "x86_64"
MANIFEST = "kernel.json"
# What a build keeps (cache name: path in the kernel tree).
KEPT = {
    "vmlinux": "vmlinux",
    "bzImage": "arch/x86/boot/bzImage",
    "config": ".config",
    "System.map": "System.map",
}
INIT_NAME = "init"
INITRAMFS_NAME = "initramfs.cpio"

# The guest command line for a PVM host (linux-on-pvm.md), without tsc_early_khz,
# which the VMM adds from KVM_GET_TSC_KHZ, and without virtio_mmio.device= entries.
RECOMMENDED_CMDLINE = (
    "console=ttyS0 panic=-1 reboot=k poweroff_port=0x501 noxsave tsc=reliable"
    " clearcpuid=popcnt,fsgsbase,smap,smep,invpcid,pcid,rdrand,rdseed,rdtscp,rdpid,xsave,umip,"
    "erms,fsrm quiet rodata=off"
)

INIT_CFLAGS = (
    "-Os",
    "-static",
    "-nostdlib",
    "-ffreestanding",
    "-fno-builtin",
    "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables",
    "-fno-unwind-tables",
    "-fno-pie",
    "-no-pie",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-Wl,--build-id=none",
    "-Wl,-z,noexecstack",
    "-s",
)

MAKE_PROGRESS_EVERY_S = 30.0

Progress = Callable[[str], None]


class LinuxBuildError(KvmkitError):
    """Building the test kernel failed; the message names the step and where the log is."""


class PrerequisiteError(LinuxBuildError):
    """Something the build needs is not installed; the message says how to install it."""


@dataclass(frozen=True)
class TestKernel:
    """A built test kernel: files in its cache directory and the command line to use."""

    __test__: ClassVar[bool] = False  # not a pytest test class

    vmlinux: Path
    bzimage: Path
    initramfs: Path
    cmdline: str
    version: str
    hash: str
    directory: Path
    config: Path
    system_map: Path
    init: Path


# ------------------------------------------------------------------ inputs and hash


def tarball_path() -> Path:
    """The kernel source tarball: $KVMKIT_LINUX_SOURCE, else Debian's package file."""
    env = os.environ.get(TARBALL_ENV)
    return Path(env) if env else DEFAULT_TARBALL


def apt_hint() -> str:
    return (
        f"run 'apt-get install {' '.join(APT_PACKAGES)}' or"
        " 'kvmkit kernel build --install-deps' as root"
    )


def check_prerequisites(
    tarball: Path,
    which: Callable[[str], str | None] = shutil.which,
    libelf_header: Path = LIBELF_HEADER,
    package_tarball: Path = DEFAULT_TARBALL,
) -> str | None:
    """The first missing prerequisite as one line naming the fix, or None
    (`package_tarball`: where the Debian package puts its tarball)."""
    if not tarball.is_file():
        if tarball != package_tarball:
            return f"{TARBALL_ENV}={tarball} is not a file: point it at a Linux source tarball"
        return f"{SOURCE_PACKAGE} is not installed ({tarball} is missing): {apt_hint()}"
    missing = [tool for tool in TOOLS if which(tool) is None]
    if missing:
        return f"building the test kernel needs {', '.join(missing)}: {apt_hint()}"
    if not libelf_header.is_file():
        return f"libelf-dev is not installed ({libelf_header} is missing): {apt_hint()}"
    return None


def why_unbuildable() -> str | None:
    """Why `kvmkit kernel build` cannot work on this machine (one line), or None."""
    return check_prerequisites(tarball_path())


def source_identity(tarball: Path) -> str:
    """Which kernel source: the Debian package version for the package's tarball,
    else the tarball's name, size and mtime."""
    if tarball == DEFAULT_TARBALL:
        try:
            proc = subprocess.run(
                ["dpkg-query", "-W", "-f=${Version}", SOURCE_PACKAGE],
                capture_output=True,
                text=True,
                timeout=30,
            )
        except (OSError, subprocess.TimeoutExpired):
            proc = None
        if proc is not None and proc.returncode == 0 and proc.stdout.strip():
            return f"{SOURCE_PACKAGE} {proc.stdout.strip()}"
    st = tarball.stat()
    return f"{tarball.name} size={st.st_size} mtime_ns={st.st_mtime_ns}"


def input_files(root: Path = HERE) -> list[Path]:
    """Every file the build output depends on, in a fixed order."""
    files = [root / FRAGMENT_NAME]
    files += sorted((root / PATCH_DIR_NAME).glob("*.patch"))
    files += sorted(p for p in (root / INIT_DIR_NAME).iterdir() if p.is_file())
    files.append(root / "initramfs.py")
    return files


def inputs_digest(root: Path = HERE, builder_version: int = BUILDER_VERSION) -> str:
    """A digest of the builder version and every input file (name and bytes)."""
    import hashlib  # here, not at import: OpenSSL costs a run 3.5 MB of RSS

    h = hashlib.sha256(f"kvmkit-linux builder {builder_version}\n".encode())
    for path in input_files(root):
        data = path.read_bytes()
        h.update(f"{path.relative_to(root)}\0{len(data)}\0".encode() + data)
    return h.hexdigest()


def build_hash(inputs: str, source: str) -> str:
    """The cache key of a build: its inputs and its kernel source."""
    import hashlib

    return hashlib.sha256(f"{inputs}\n{source}\n".encode()).hexdigest()[:16]


LINUX_CACHE_ENV = "KVMKIT_LINUX_CACHE_DIR"


def linux_cache_root() -> Path:
    """Where test kernels are cached: $KVMKIT_LINUX_CACHE_DIR, else the kvmkit cache's
    linux/ (a test session that isolates the guest cache keeps the kernel cache)."""
    if env := os.environ.get(LINUX_CACHE_ENV):
        return Path(env)
    return cache_dir() / "linux"


# ------------------------------------------------------------------ finding a build


def load_build(directory: Path) -> TestKernel | None:
    """The build in `directory`, or None if it is absent or incomplete."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        kernel = TestKernel(
            vmlinux=directory / "vmlinux",
            bzimage=directory / "bzImage",
            initramfs=directory / INITRAMFS_NAME,
            cmdline=str(manifest["cmdline"]),
            version=str(manifest["version"]),
            hash=str(manifest["hash"]),
            directory=directory,
            config=directory / "config",
            system_map=directory / "System.map",
            init=directory / INIT_NAME,
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    files = (kernel.vmlinux, kernel.bzimage, kernel.initramfs, kernel.config)
    return kernel if all(f.is_file() for f in files) else None


def find_test_kernel() -> TestKernel | None:
    """The cached build for the current inputs and source, or None.

    Without the source tarball (removed after building), the newest build of the
    current inputs is used."""
    root = linux_cache_root()
    inputs = inputs_digest()
    tarball = tarball_path()
    if tarball.is_file():
        return load_build(root / build_hash(inputs, source_identity(tarball)))
    candidates = []
    for manifest in root.glob(f"*/{MANIFEST}"):
        try:
            data = json.loads(manifest.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("inputs") == inputs:
            candidates.append((manifest.stat().st_mtime, manifest.parent))
    for _, directory in sorted(candidates, reverse=True):
        if kernel := load_build(directory):
            return kernel
    return None


# ------------------------------------------------------------------ building


def _say(progress: Progress | None, message: str) -> None:
    if progress is not None:
        progress(message)


def _run(cmd: list[str], cwd: Path, log: Path, step: str, env: dict[str, str] | None = None) -> str:
    """Run a build step, appending its output to the log; its stdout on success."""
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
    with log.open("a") as f:
        f.write(f"$ {' '.join(cmd)}\n{proc.stdout}{proc.stderr}")
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        raise LinuxBuildError(
            f"{step} failed (exit {proc.returncode}): {' | '.join(lines[-4:]) or 'no output'};"
            f" log: {log}"
        )
    return proc.stdout


def _make_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        ARCH=ARCH,
        LC_ALL="C",
        KBUILD_BUILD_USER="kvmkit",
        KBUILD_BUILD_HOST="kvmkit",
    )
    env.pop("KCONFIG_CONFIG", None)
    return env


def check_config(fragment: str, config: str) -> list[str]:
    """Fragment settings the final .config does not have (a symbol whose
    dependencies are unmet is dropped silently by Kconfig)."""
    have: dict[str, str] = {}
    for line in config.splitlines():
        if line.startswith("CONFIG_") and "=" in line:
            name, _, value = line.partition("=")
            have[name] = value
    problems = []
    for line in fragment.splitlines():
        line = line.strip()
        if line.startswith("CONFIG_") and "=" in line:
            name, _, value = line.partition("=")
            if have.get(name) != value:
                got = have.get(name)
                problems.append(f"{name}={value} (got {name}={got})" if got else f"{line} (unset)")
        elif line.startswith("# CONFIG_") and line.endswith(" is not set"):
            name = line[2:].split()[0]
            if have.get(name, "n") != "n":
                problems.append(f"{name} off (got {name}={have[name]})")
    return problems


def _prepare_source(tarball: Path, work: Path, root: Path, progress: Progress | None) -> Path:
    """The extracted, patched source tree in work/src (done once per hash)."""
    src = work / "src"
    stamp = work / ".prepared"
    if stamp.is_file():
        return src
    log = work / "build.log"
    if src.exists():
        shutil.rmtree(src)
    src.mkdir(parents=True)
    _say(progress, f"extracting {tarball} (about 30 s)")
    _run(["tar", "-xf", str(tarball), "-C", str(src), "--strip-components=1"], work, log, "tar")
    for patch in sorted((root / PATCH_DIR_NAME).glob("*.patch")):
        _say(progress, f"applying {patch.name}")
        _run(
            ["patch", "-p1", "-N", "--no-backup-if-mismatch", "-i", str(patch)],
            src,
            log,
            f"patch {patch.name}",
        )
    stamp.write_text(f"{tarball}\n")
    return src


def _configure(src: Path, work: Path, root: Path, progress: Progress | None) -> None:
    log = work / "build.log"
    env = _make_env()
    fragment = root / FRAGMENT_NAME
    _say(progress, f"configuring: make tinyconfig + {FRAGMENT_NAME}")
    _run(["make", "tinyconfig"], src, log, "make tinyconfig", env)
    _run(
        ["scripts/kconfig/merge_config.sh", "-m", ".config", str(fragment)],
        src,
        log,
        "merge_config.sh",
        env,
    )
    _run(["make", "olddefconfig"], src, log, "make olddefconfig", env)
    problems = check_config(fragment.read_text(), (src / ".config").read_text())
    if problems:
        raise LinuxBuildError(
            f"{FRAGMENT_NAME}: Kconfig did not take {'; '.join(problems[:5])}"
            " (a dependency is missing: add it to the fragment)"
        )


def _make_kernel(src: Path, work: Path, jobs: int, progress: Progress | None) -> None:
    log = work / "build.log"
    cmd = ["make", f"-j{jobs}", "vmlinux", "bzImage"]
    _say(progress, f"building vmlinux and bzImage: {' '.join(cmd)} (about 7 min with 2 CPUs)")
    start = last = time.monotonic()
    compiled = 0
    tail: deque[str] = deque(maxlen=30)
    with log.open("a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        proc = subprocess.Popen(
            cmd,
            cwd=src,
            env=_make_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            f.write(line)
            tail.append(line.rstrip())
            if line.startswith(("  CC ", "  AS ")):
                compiled += 1
            now = time.monotonic()
            if now - last >= MAKE_PROGRESS_EVERY_S:
                last = now
                _say(progress, f"make: {now - start:.0f} s, {compiled} files compiled")
        rc = proc.wait()
    if rc != 0:
        errors = [t for t in tail if "error" in t.lower()] or list(tail)
        raise LinuxBuildError(f"make failed (exit {rc}): {' | '.join(errors[-4:])}; log: {log}")
    _say(progress, f"make: done in {time.monotonic() - start:.0f} s, {compiled} files compiled")


def build_init(root: Path, out: Path, log: Path) -> bytes:
    """Compile the static test init; its bytes."""
    source = root / INIT_DIR_NAME / "init.c"
    _run(["gcc", *INIT_CFLAGS, "-o", str(out), str(source)], out.parent, log, "gcc init.c")
    return out.read_bytes()


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def install_prerequisites(progress: Progress | None = None, euid: int | None = None) -> None:
    """apt-get update and install the build prerequisites (root only)."""
    if (os.geteuid() if euid is None else euid) != 0:
        raise PrerequisiteError(
            "--install-deps runs apt-get and needs root: run it as root, or run"
            f" 'apt-get install {' '.join(APT_PACKAGES)}' as root"
        )
    if shutil.which("apt-get") is None:
        raise PrerequisiteError(
            f"--install-deps needs apt-get (Debian/Ubuntu): install {' '.join(APT_PACKAGES)}"
            " with this system's package manager"
        )
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (
        ["apt-get", "update"],
        ["apt-get", "install", "-y", "--no-install-recommends", *APT_PACKAGES],
    ):
        _say(progress, " ".join(cmd))
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            lines = (proc.stderr or proc.stdout).strip().splitlines()
            raise PrerequisiteError(
                f"{' '.join(cmd[:2])} failed (exit {proc.returncode}): "
                + (" | ".join(lines[-3:]) or "no output")
            )


def build_test_kernel(
    jobs: int | None = None,
    progress: Progress | None = None,
    force: bool = False,
    keep_source: bool = False,
) -> TestKernel:
    """Build (or with force, rebuild) the test kernel for the current inputs."""
    tarball = tarball_path()
    if problem := check_prerequisites(tarball):
        raise PrerequisiteError(problem)
    inputs = inputs_digest()
    source = source_identity(tarball)
    key = build_hash(inputs, source)
    root = linux_cache_root()
    final = root / key
    with _locked(root / f"{key}.lock"):
        if not force and (kernel := load_build(final)):
            return kernel
        work = root / f"{key}.work"
        work.mkdir(parents=True, exist_ok=True)
        log = work / "build.log"
        started = time.monotonic()
        _say(progress, f"building test kernel {key} from {source}; log: {log}")
        src = _prepare_source(tarball, work, HERE, progress)
        _configure(src, work, HERE, progress)
        _make_kernel(src, work, jobs or os.cpu_count() or 1, progress)
        version = _run(
            ["make", "-s", "kernelrelease"], src, log, "make kernelrelease", _make_env()
        ).strip()
        _say(progress, "building init and initramfs")
        init = build_init(HERE, work / INIT_NAME, log)
        staging = root / f".{key}.tmp{os.getpid()}"
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir()
        for name, rel in KEPT.items():
            shutil.copyfile(src / rel, staging / name)
        shutil.copyfile(work / INIT_NAME, staging / INIT_NAME)
        shutil.copyfile(log, staging / "build.log")
        (staging / INITRAMFS_NAME).write_bytes(init_archive(init))
        manifest = {
            "hash": key,
            "inputs": inputs,
            "source": source,
            "version": version,
            "cmdline": RECOMMENDED_CMDLINE,
            "builder_version": BUILDER_VERSION,
            "build_seconds": round(time.monotonic() - started, 1),
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        old = root / f".{key}.old{os.getpid()}"
        if final.exists():
            final.rename(old)
        staging.rename(final)
        if old.exists():
            shutil.rmtree(old)
        if not keep_source:
            _say(progress, f"deleting the kernel tree {work} (kept: {', '.join(KEPT)})")
            shutil.rmtree(work)
    kernel = load_build(final)
    if kernel is None:
        raise LinuxBuildError(f"the build in {final} is incomplete after building")
    _say(progress, f"done: {final}")
    return kernel


def ensure_test_kernel(
    jobs: int | None = None, install_deps: bool = False, progress: Progress | None = None
) -> TestKernel:
    """The cached test kernel, built first if there is none (about 7 min)."""
    if kernel := find_test_kernel():
        return kernel
    if install_deps and why_unbuildable() is not None:
        install_prerequisites(progress)
    return build_test_kernel(jobs=jobs, progress=progress)
