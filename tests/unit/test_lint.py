"""ruff and mypy are part of the test suite, so the README's test command also keeps the
code clean."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_ruff_clean():
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (pip install '.[test]' installs it)")
    p = subprocess.run(
        [ruff, "check", "--no-cache", "kvmkit", "tests", "benchmarks"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert p.returncode == 0, p.stdout + p.stderr


def test_mypy_clean():
    """mypy over kvmkit/ with pyproject.toml's settings (strict for kvm/, uapi/,
    memory/, devices/)."""
    pytest.importorskip("mypy", reason="mypy is not installed (pip install '.[test]')")
    p = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-incremental"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert p.returncode == 0, p.stdout + p.stderr


def test_package_imports_without_kvm():
    p = subprocess.run(
        [sys.executable, "-c", "import kvmkit.cli, kvmkit.machine, kvmkit.uapi.ioctls"],
        capture_output=True,
        text=True,
    )
    assert p.returncode == 0, p.stderr
