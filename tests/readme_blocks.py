"""The README's code blocks, as the README tests read them.

A fenced block may be preceded by a marker comment saying how it is checked:

- `<!-- readme: run -->`: run it (a `sh` block line by line with bash, a `python`
  block with the interpreter) in an empty directory; each must exit 0.
- `<!-- readme: example FILE -->`: a `python` block that is the file `examples/FILE`,
  word for word (the suite runs the file itself).
- `<!-- readme: skip REASON -->`: not run, for the reason given.
- no marker: a `sh` block's `kvmkit` command lines must parse with kvmkit's real
  argument parser (optional parts in `[...]` included); other languages are output
  samples and are not checked, except `python`, which needs a marker.
"""

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
_MARKER = re.compile(r"^<!--\s*readme:\s*(run|example|skip)\b\s*(.*?)\s*-->\s*$")


@dataclass(frozen=True)
class Block:
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    mark: str | None  # run, example, skip or None
    arg: str  # the example's file, or why it is skipped

    @property
    def where(self) -> str:
        return f"README.md:{self.line}"


def blocks(path: Path = README) -> list[Block]:
    lines = path.read_text().splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        if lines[i].startswith("```"):
            lang = lines[i][3:].strip()
            start = i
            i += 1
            body: list[str] = []
            while i < len(lines) and not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            mark, arg = None, ""
            j = start - 1
            while j >= 0 and not lines[j].strip():
                j -= 1
            m = _MARKER.match(lines[j].strip()) if j >= 0 else None
            if m:
                mark, arg = m.group(1), m.group(2)
            found.append(Block(start + 1, lang, "\n".join(body) + "\n", mark, arg))
        i += 1
    return found


def commands(block: Block) -> list[str]:
    """The block's shell commands: continuation lines joined, comments dropped."""
    joined: list[str] = []
    pending = ""
    for raw in block.text.splitlines():
        line = pending + raw
        if line.rstrip().endswith("\\"):
            pending = line.rstrip()[:-1] + " "
            continue
        pending = ""
        if line.strip():
            joined.append(line)
    return joined


def kvmkit_argvs(command: str) -> list[list[str]]:
    """Every kvmkit invocation in a shell command line, as argv lists after `kvmkit`,
    with optional `[...]` parts included (and `A|B` alternatives taken as A)."""
    command = re.sub(r"\[([^\]]*)\]", r"\1", command)
    try:
        words = shlex.split(command, comments=True)
    except ValueError:
        return []
    found: list[list[str]] = []
    current: list[str] | None = None
    for word in words:
        ends = word.endswith(";") and word != ";"
        word = word.rstrip(";") if ends else word
        if word in ("&&", "||", ";", "|", "&", ">", "2>", "<"):
            if current is not None:
                found.append(current)
            current = None
            continue
        if word == "...":  # a placeholder for more of the same
            continue
        if word == "kvmkit":
            current = []
        elif current is not None:
            current.append(word.split("|")[0] if word.startswith("-") else word)
        if ends and current is not None:
            found.append(current)
            current = None
    if current is not None:
        found.append(current)
    return found
