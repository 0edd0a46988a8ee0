"""The README stays true: its command lines parse with kvmkit's own parser, its
Python blocks are run or are the example files, every block says how it is checked.
(tests/kvm/test_readme_runs.py runs the blocks marked `run`.)"""

import contextlib
import io
from pathlib import Path

import pytest

from kvmkit.cli import VALUED, build_parser
from kvmkit.cli_args import join_dashed_values
from tests.readme_blocks import blocks, commands, kvmkit_argvs

EXAMPLES = Path(__file__).resolve().parent.parent.parent / "examples"
SHELL_BLOCKS = [b for b in blocks() if b.lang == "sh" and b.mark != "skip"]


def test_every_python_block_says_how_it_is_checked() -> None:
    unmarked = [b.where for b in blocks() if b.lang == "python" and b.mark is None]
    assert not unmarked, (
        f"python blocks without a <!-- readme: run|example FILE|skip WHY --> marker: {unmarked}"
    )


@pytest.mark.parametrize("block", [b for b in blocks() if b.mark == "example"], ids=str)
def test_example_blocks_are_the_example_files(block) -> None:  # noqa: ANN001
    path = EXAMPLES / block.arg
    assert path.is_file(), f"{block.where} names examples/{block.arg}, which does not exist"
    shown = block.text.split("\n", 1)[1] if block.text.startswith("# ") else block.text
    assert shown.strip() == path.read_text().strip(), f"{block.where} differs from {path}"


def test_skips_give_a_reason() -> None:
    assert all(b.arg for b in blocks() if b.mark == "skip")


@pytest.mark.parametrize("block", SHELL_BLOCKS, ids=lambda b: b.where)
def test_readme_command_lines_parse(block) -> None:  # noqa: ANN001
    parser = build_parser()
    for command in commands(block):
        for argv in kvmkit_argvs(command):
            err = io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                try:
                    parser.parse_args(join_dashed_values(argv, VALUED))
                except SystemExit as e:
                    shown = " ".join(argv)
                    assert e.code == 0, f"{block.where}: `kvmkit {shown}`: {err.getvalue()}"
