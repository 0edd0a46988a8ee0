"""The test-kernel builder's cache key, cache lookup and prerequisite messages
(nothing here builds a kernel)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kvmkit.guests.linux import build

PACKAGE_DIR = Path(build.__file__).parent


@pytest.fixture
def package_copy(tmp_path):
    root = tmp_path / "linux"
    shutil.copytree(PACKAGE_DIR, root, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def test_digest_is_stable_and_covers_every_input(package_copy):
    base = build.inputs_digest(package_copy)
    assert build.inputs_digest(package_copy) == base
    assert build.inputs_digest(package_copy, build.BUILDER_VERSION + 1) != base
    edits = [
        package_copy / "config.fragment",
        package_copy / "init" / "init.c",
        package_copy / "init" / "pattern.h",
        package_copy / "initramfs.py",
        *sorted((package_copy / "patches").glob("*.patch")),
    ]
    assert len(edits) >= 6  # at least one patch besides the fixed inputs
    for path in edits:
        original = path.read_bytes()
        path.write_bytes(original + b"\n")
        assert build.inputs_digest(package_copy) != base, path.name
        path.write_bytes(original)
    assert build.inputs_digest(package_copy) == base


def test_adding_a_patch_changes_the_digest(package_copy):
    base = build.inputs_digest(package_copy)
    (package_copy / "patches" / "9999-extra.patch").write_text("--- a/x\n+++ b/x\n")
    assert build.inputs_digest(package_copy) != base


def test_hash_depends_on_the_source(package_copy):
    inputs = build.inputs_digest(package_copy)
    a = build.build_hash(inputs, "linux-source-6.12 6.12.117-1~deb12u1")
    b = build.build_hash(inputs, "linux-source-6.12 6.12.118-1~deb12u1")
    assert (
        a != b
        and len(a) == 16
        and a == build.build_hash(inputs, "linux-source-6.12 6.12.117-1~deb12u1")
    )


def test_a_tarball_outside_the_package_is_identified_by_size_and_mtime(tmp_path):
    tarball = tmp_path / "linux.tar.xz"
    tarball.write_bytes(b"x" * 10)
    os.utime(tarball, ns=(1, 1_000_000_000))
    first = build.source_identity(tarball)
    assert first == "linux.tar.xz size=10 mtime_ns=1000000000"
    tarball.write_bytes(b"x" * 11)
    assert build.source_identity(tarball) != first


def test_the_cache_lives_under_kvmkit_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("KVMKIT_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv(build.LINUX_CACHE_ENV, raising=False)
    assert build.linux_cache_root() == tmp_path / "linux"


def _cached_build(directory: Path, files: tuple[str, ...]) -> None:
    """Lay out a cache entry (placeholder files): what the lookup reads, nothing more."""
    directory.mkdir(parents=True)
    for name in files:
        (directory / name).write_bytes(b"placeholder")
    manifest = {
        "hash": directory.name,
        "inputs": build.inputs_digest(),
        "source": "s",
        "version": "6.12.117",
        "cmdline": build.RECOMMENDED_CMDLINE,
    }
    (directory / build.MANIFEST).write_text(json.dumps(manifest))


def test_lookup_needs_the_manifest_and_every_kept_file(tmp_path):
    complete = tmp_path / "aaaa"
    _cached_build(complete, ("vmlinux", "bzImage", "initramfs.cpio", "config", "System.map"))
    kernel = build.load_build(complete)
    assert kernel is not None and kernel.vmlinux == complete / "vmlinux"
    assert kernel.version == "6.12.117" and kernel.hash == "aaaa"
    assert "tsc_early_khz" not in kernel.cmdline and "console=ttyS0" in kernel.cmdline
    partial = tmp_path / "bbbb"
    _cached_build(partial, ("vmlinux", "config"))
    assert build.load_build(partial) is None
    assert build.load_build(tmp_path / "missing") is None
    (complete / build.MANIFEST).write_text("{not json")
    assert build.load_build(complete) is None


def test_find_uses_the_hash_of_the_current_source(tmp_path, monkeypatch):
    monkeypatch.setenv("KVMKIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv(build.LINUX_CACHE_ENV, raising=False)
    tarball = tmp_path / "linux.tar.xz"
    tarball.write_bytes(b"source")
    monkeypatch.setenv(build.TARBALL_ENV, str(tarball))
    assert build.find_test_kernel() is None
    key = build.build_hash(build.inputs_digest(), build.source_identity(tarball))
    _cached_build(
        tmp_path / "cache" / "linux" / key,
        ("vmlinux", "bzImage", "initramfs.cpio", "config", "System.map"),
    )
    found = build.find_test_kernel()
    assert found is not None and found.hash == key
    tarball.write_bytes(b"another source")  # a new source: that build is not it
    assert build.find_test_kernel() is None
    tarball.unlink()  # source removed after building: the build of these inputs is used
    found = build.find_test_kernel()
    assert found is not None and found.hash == key


def test_check_config_reports_what_kconfig_dropped():
    fragment = "CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=16\nCONFIG_D=y\n# a comment\n"
    config = "CONFIG_A=y\nCONFIG_B=y\nCONFIG_C=8\n# CONFIG_D is not set\n"
    problems = build.check_config(fragment, config)
    assert problems == [
        "CONFIG_B off (got CONFIG_B=y)",
        "CONFIG_C=16 (got CONFIG_C=8)",
        "CONFIG_D=y (unset)",
    ]
    assert build.check_config("CONFIG_A=y\n# CONFIG_B is not set\n", "CONFIG_A=y\n") == []


def test_the_fragment_asks_for_what_the_guest_needs():
    fragment = (PACKAGE_DIR / "config.fragment").read_text()
    for symbol in (
        "SMP",
        "X86_MPPARSE",
        "PVH",
        "VIRTIO_MMIO",
        "VIRTIO_MMIO_CMDLINE_DEVICES",
        "VIRTIO_BLK",
        "VIRTIO_NET",
        "VSOCKETS",
        "VIRTIO_VSOCKETS",
        "HW_RANDOM_VIRTIO",
        "VIRTIO_BALLOON",
        "PAGE_REPORTING",
        "SERIAL_8250_CONSOLE",
        "DEVTMPFS",
        "BLK_DEV_INITRD",
        "BINFMT_ELF",
        "MAGIC_SYSRQ",
        "HZ_100",
        "NO_HZ_IDLE",
    ):
        assert f"CONFIG_{symbol}=y\n" in fragment, symbol
    for symbol in ("ACPI", "JUMP_LABEL", "MODULES", "PREEMPT_DYNAMIC"):
        assert f"# CONFIG_{symbol} is not set\n" in fragment, symbol
    assert 'CONFIG_INITRAMFS_SOURCE=""' in fragment


def test_every_patch_says_why_in_a_header():
    patches = sorted((PACKAGE_DIR / "patches").glob("*.patch"))
    assert patches
    for patch in patches:
        header = patch.read_text().split("\n--- a/", 1)[0]
        assert patch.name[:4].isdigit() and "Measured" in header, patch.name


# ------------------------------------------------------------------ prerequisites


def test_missing_source_package_names_the_fix(tmp_path):
    package_tarball = tmp_path / "linux-source-6.12.tar.xz"  # not installed
    message = build.check_prerequisites(package_tarball, package_tarball=package_tarball)
    assert message.startswith(f"linux-source-6.12 is not installed ({package_tarball} is missing)")
    assert "apt-get install linux-source-6.12 bc flex bison libelf-dev" in message
    assert "kvmkit kernel build --install-deps" in message


def test_missing_tools_are_named_with_the_fix(tmp_path):
    tarball = tmp_path / "linux.tar.xz"
    tarball.write_bytes(b"")
    header = tmp_path / "gelf.h"
    header.write_text("")

    def which(name):
        return None if name in ("bison", "bc") else f"/usr/bin/{name}"

    message = build.check_prerequisites(tarball, which, header)
    assert message == (
        "building the test kernel needs bc, bison: run 'apt-get install "
        + " ".join(build.APT_PACKAGES)
        + "' or 'kvmkit kernel build --install-deps' as root"
    )
    assert build.check_prerequisites(tarball, lambda n: "/bin/" + n, header) is None
    message = build.check_prerequisites(tarball, lambda n: "/bin/" + n, tmp_path / "no.h")
    assert message and message.startswith("libelf-dev is not installed")


def test_env_variable_pointing_nowhere(tmp_path, monkeypatch):
    monkeypatch.setenv(build.TARBALL_ENV, str(tmp_path / "nothing.tar.xz"))
    assert build.why_unbuildable() == (
        f"{build.TARBALL_ENV}={tmp_path / 'nothing.tar.xz'} is not a file:"
        " point it at a Linux source tarball"
    )


def test_install_deps_needs_root():
    with pytest.raises(build.PrerequisiteError, match="needs root: run it as root"):
        build.install_prerequisites(euid=1000)


def _cli(*args, env=None):
    """kvmkit kernel ARGS with `env` (its KVMKIT_CACHE_DIR holds the kernel cache too)."""
    return subprocess.run(
        [sys.executable, "-m", "kvmkit", "kernel", *args],
        capture_output=True,
        text=True,
        env={k: v for k, v in {**os.environ, **(env or {})}.items() if k != build.LINUX_CACHE_ENV},
    )


def test_cli_build_without_prerequisites_is_one_line(tmp_path):
    p = _cli(
        "build",
        env={
            build.TARBALL_ENV: str(tmp_path / "none.tar.xz"),
            "KVMKIT_CACHE_DIR": str(tmp_path / "cache"),
        },
    )
    assert p.returncode == 1
    assert p.stderr.strip().splitlines() == [
        f"kvmkit: error: {build.TARBALL_ENV}={tmp_path / 'none.tar.xz'} is not a file:"
        " point it at a Linux source tarball"
    ]


def test_cli_path_without_a_build_says_how_to_build(tmp_path):
    p = _cli("path", env={"KVMKIT_CACHE_DIR": str(tmp_path)})
    assert p.returncode == 1 and p.stdout == ""
    assert "run 'kvmkit kernel build'" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_cli_path_json_for_a_cached_build(tmp_path):
    tarball = tmp_path / "linux.tar.xz"
    tarball.write_bytes(b"source")
    key = build.build_hash(build.inputs_digest(), build.source_identity(tarball))
    _cached_build(
        tmp_path / "cache" / "linux" / key,
        ("vmlinux", "bzImage", "initramfs.cpio", "config", "System.map"),
    )
    p = _cli(
        "path",
        "--json",
        env={"KVMKIT_CACHE_DIR": str(tmp_path / "cache"), build.TARBALL_ENV: str(tarball)},
    )
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout)
    assert info["vmlinux"] == str(tmp_path / "cache" / "linux" / key / "vmlinux")
    assert info["hash"] == key and info["cmdline"] == build.RECOMMENDED_CMDLINE


def test_cli_rejects_a_bad_jobs_value(tmp_path):
    p = _cli("build", "--jobs", "zero", env={"KVMKIT_CACHE_DIR": str(tmp_path)})
    assert p.returncode == 2 and "--jobs 'zero' is not a number" in p.stderr


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is needed to build the init")
def test_the_init_builds_static_and_small(tmp_path):
    data = build.build_init(PACKAGE_DIR, tmp_path / "init", tmp_path / "build.log")
    assert data[:4] == b"\x7fELF" and data[4] == 2  # ELF64
    assert len(data) < 64 * 1024  # the initramfs unpack is emulated: keep it small
    # static: no program header of type PT_INTERP (3)
    phoff = int.from_bytes(data[32:40], "little")
    phentsize = int.from_bytes(data[54:56], "little")
    phnum = int.from_bytes(data[56:58], "little")
    types = [
        int.from_bytes(data[phoff + i * phentsize : phoff + i * phentsize + 4], "little")
        for i in range(phnum)
    ]
    assert 1 in types and 3 not in types
