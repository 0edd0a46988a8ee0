"""The one progress display of the command line, for all long work (snapshots,
restores, migrations, selftests): a rich bar on a terminal, plain lines elsewhere.

On a terminal (stderr is a TTY) the bar shows the stage, a bar when the total is
known, the numbers the caller gives and the elapsed time, and disappears at the end.
Without a terminal (a log, a pipe, CI) there is one line per new stage the caller
marks as a milestone, so logs stay short and still say how far the work got.
"""

import sys
from types import TracebackType
from typing import Any, TextIO


class Progress:
    def __init__(self, what: str, stream: TextIO | None = None) -> None:
        self.what = what
        self.stream = stream if stream is not None else sys.stderr
        self.bar: Any = None  # rich.progress.Progress, on a terminal
        self.task: Any = None
        self._last_stage: str | None = None

    def __enter__(self) -> "Progress":
        if self.stream.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as RichProgress

            self.bar = RichProgress(
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("{task.fields[numbers]}"),
                TimeElapsedColumn(),
                console=Console(file=self.stream),
                transient=True,
            )
            self.bar.__enter__()
            self.task = self.bar.add_task(self.what, total=None, numbers="")
        return self

    def update(
        self,
        stage: str,
        done: int | None = None,
        total: int | None = None,
        numbers: str = "",
        milestone: bool = True,
    ) -> None:
        """Show `stage` (with `done` of `total` when known, and `numbers`). Plain
        output prints a line when a milestone starts a stage not printed yet."""
        if self.bar is not None:
            self.bar.update(
                self.task,
                description=stage or self.what,
                total=total or None,
                completed=done or 0 if total else 0,
                numbers=numbers,
            )
            return
        if milestone and stage != self._last_stage:
            self._last_stage = stage
            print(f"kvmkit: {stage}: {numbers}".rstrip(": "), file=self.stream)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.bar is not None:
            self.bar.__exit__(exc_type, exc, tb)
            self.bar = None
