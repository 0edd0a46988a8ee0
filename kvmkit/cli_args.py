"""Argument types and argv handling the command line's parsers share."""

import argparse
from collections.abc import Sequence

MAX_SECONDS = 365 * 86400


def positive_seconds(text: str) -> float:
    """A number of seconds, more than 0 and under a year (an argparse type)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value < MAX_SECONDS:
        raise argparse.ArgumentTypeError(f"{text!r} must be more than 0 and under a year")
    return value


def join_dashed_values(argv: Sequence[str], options: frozenset[str]) -> list[str]:
    """`--memory -1M` as `--memory=-1M`, for options that take a value: argparse would
    read `-1M` as an unknown option and say only "expected one argument", where the
    option's own check gives the clear message."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if (
            arg in options
            and i + 1 < len(argv)
            and argv[i + 1].startswith("-")
            and argv[i + 1] != "-"
        ):
            nxt = argv[i + 1]
            if nxt[1:2].isdigit() or nxt[1:2] == ".":
                out.append(f"{arg}={nxt}")
                i += 2
                continue
        out.append(arg)
        i += 1
    return out
