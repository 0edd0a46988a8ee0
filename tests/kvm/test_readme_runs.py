"""The README's blocks marked `<!-- readme: run -->` run as a user would paste them,
in an empty directory: each command exits 0, or the status its comment states as
`(exit N)`; a Python block runs to its end. Shell blocks run in the repository's
root, as from a fresh clone; Python blocks in an empty directory."""

import re
import subprocess
import sys

import pytest

from tests.readme_blocks import README, Block, blocks, commands

RUN = [b for b in blocks() if b.mark == "run"]
_EXIT = re.compile(r"#.*\(exit (\d+)\)")


@pytest.mark.parametrize("block", RUN, ids=lambda b: b.where)
def test_readme_block_runs(block: Block, tmp_path) -> None:  # noqa: ANN001
    if block.lang == "python":
        p = subprocess.run(
            [sys.executable, "-c", block.text],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert p.returncode == 0, f"{block.where}:\n{p.stdout}\n{p.stderr}"
        assert "Traceback" not in p.stderr
        return
    assert block.lang == "sh", f"{block.where}: only sh and python blocks can be run"
    for command in commands(block):
        m = _EXIT.search(command)
        want = int(m.group(1)) if m else 0
        p = subprocess.run(
            ["bash", "-c", command],
            cwd=README.parent,
            capture_output=True,
            text=True,
            timeout=300,
            stdin=subprocess.DEVNULL,
        )
        assert p.returncode == want, f"{block.where}: `{command}`:\n{p.stdout[-2000:]}\n{p.stderr}"
        assert "Traceback" not in p.stderr, f"{block.where}: `{command}`:\n{p.stderr}"
