"""The README's two test examples are the files in examples/, verbatim, and they pass
when pytest runs them as a user would: through kvmkit's installed pytest plugin."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("test_*.py"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_is_in_the_readme_verbatim_and_short(path):
    text = path.read_text()
    assert f"```python\n# {path.name}\n{text}```" in (ROOT / "README.md").read_text()
    assert len(text.splitlines()) < 30


def test_examples_pass_through_the_plugin(tmp_path):
    p = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *map(str, EXAMPLES)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,  # not the repository: only the installed plugin provides the fixtures
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert "4 passed" in p.stdout
