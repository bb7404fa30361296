"""L0 — one optional rich progress bar on stderr, shared by the merge paths."""
from __future__ import annotations

import threading
from typing import Any, Callable, Sequence


class ProgressBar:
    """A rich ``Progress`` with one task when ``show``, else nothing at all (every call is a no-op).

    ``columns`` builds the bar's columns (called only when shown, so rich is imported only then);
    :meth:`update` may be called from worker threads.
    """

    def __init__(self, show: bool, columns: Callable[[], Sequence[Any]], total: float, **fields: Any):
        self.show = show and total > 0
        self._lock = threading.Lock()
        if self.show:
            from rich.console import Console
            from rich.progress import Progress

            self.progress = Progress(*columns(), console=Console(stderr=True))
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
