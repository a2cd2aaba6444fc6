"""What the user sees while a run goes: one line per epoch, and in a terminal a progress bar.

In a terminal, a rich progress bar (epochs, or trials in a search, with elapsed time and ETA)
stays at the bottom and each epoch's line is printed above it. Elsewhere (job logs, CI,
a pipe) there is no bar, only the plain lines, flushed as they come.
"""

from __future__ import annotations

import sys
from types import TracebackType
from typing import Any


class Console:
    """``verbose``: Ray's own output is shown too (see ``cluster.init_ray``)."""

    def __init__(self, stream: Any = None, verbose: bool = False) -> None:
        self.stream = stream or sys.stdout
        self.verbose = verbose
        self.interactive = bool(getattr(self.stream, "isatty", lambda: False)())
        self._bar: Any = None
        self._task: Any = None
        self.gone = False  # the stream's reader closed it

    def __getstate__(self) -> dict[str, Any]:
        # Ray Tune pickles its callbacks (and so this) into its experiment state; a stream
        # cannot be pickled, and a copy restored elsewhere prints to its own stdout.
        return {"verbose": self.verbose}

    def __setstate__(self, state: dict[str, Any]) -> None:
        Console.__init__(self, verbose=state["verbose"])

    def say(self, line: str) -> None:
        """One line for the user. A reader that went away (``| head``) must not stop the
        run: the lines are dropped from then on (history.json and summary.json keep all)."""
        if self.gone:
            return
        try:
            if self._bar is not None:
                self._bar.console.print(line, markup=False, highlight=False)
            else:
                print(line, file=self.stream, flush=True)
        except BrokenPipeError:
            self.gone = True

    def progress(self, total: int, description: str) -> Console:
        """Use as ``with console.progress(n, "epochs"):`` around the work; ``advance`` moves
        the bar (nothing happens outside a terminal)."""
        if self.interactive:
            from rich.console import Console as RichConsole
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("elapsed"), TimeElapsedColumn(), TextColumn("eta"),
                TimeRemainingColumn(), console=RichConsole(file=self.stream), transient=True,
            )
            self._task = self._bar.add_task(description, total=total)
        return self

    def advance(self, completed: int | None = None) -> None:
        """One step more, or ``completed`` steps done in all (a resumed run starts later)."""
        if self._bar is None:
            return
        if completed is None:
            self._bar.advance(self._task)
        else:
            self._bar.update(self._task, completed=completed)

    def __enter__(self) -> Console:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


class QuietConsole(Console):
    """A console that says nothing: a search's trials are summarised in its own lines."""

    def say(self, line: str) -> None:
        pass
