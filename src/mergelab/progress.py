"""L0 — the consoles the commands print on, and one optional rich progress bar on stderr."""
from __future__ import annotations

import threading
from typing import Any, Callable, Sequence

#: The width of a console that is not a terminal (a pipe, a file, a log, a test's capture): tables
#: are laid out for it (they take only the width their cells need); text is never wrapped at all.
PLAIN_WIDTH = 240
#: The width of the tables printed as plain text (``judge leaderboard``, ``judge similar``): a
#: usual terminal's, whatever the output is; they wrap by columns or lines to stay within it.
TEXT_WIDTH = 80


def make_console(stderr: bool = False):
    """A rich ``Console`` on stdout (or stderr): a terminal's own width, else never wrapped.

    On a terminal rich fits tables and text to its width (``COLUMNS`` included). Elsewhere
    text is never wrapped (``soft_wrap``: a wrapped path cannot be copied) and tables are laid
    out for :data:`PLAIN_WIDTH` columns whatever ``COLUMNS`` says, so what a script or a log
    reads does not depend on the width of a terminal that is not there.
    """
    from rich.console import Console

    console = Console(stderr=stderr)
    if console.is_terminal:
        return console
    return Console(stderr=stderr, width=PLAIN_WIDTH, soft_wrap=True)


class ProgressBar:
    """A rich ``Progress`` with one task when ``show``, else nothing at all (every call is a no-op).

    ``columns`` builds the bar's columns (called only when shown, so rich is imported only then);
    :meth:`update` may be called from worker threads.
    """

    def __init__(self, show: bool, columns: Callable[[], Sequence[Any]], total: float, **fields: Any):
        self.show = show and total > 0
        self._lock = threading.Lock()
        if self.show:
            from rich.progress import Progress

            self.progress = Progress(*columns(), console=make_console(stderr=True))
            self.task = self.progress.add_task("", total=total, **fields)

    def __enter__(self) -> "ProgressBar":
        if self.show:
            self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.show:
            self.progress.__exit__(*exc)

    def update(self, **kwargs: Any) -> None:
        if self.show:
            with self._lock:
                self.progress.update(self.task, **kwargs)


def eval_columns() -> tuple:
    """The columns of an evaluation's bar: rows done of all, elapsed time and the time left."""
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return (TextColumn("[bold]evaluating[/]"), BarColumn(), MofNCompleteColumn(), TextColumn("rows"),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())
