"""A rich progress bar that shows scored tokens, tokens/s and the time left."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)


class TokensPerSecond(TextColumn):
    def __init__(self):
        super().__init__("")

    def render(self, task):
        # Average over the whole cell: batches arrive seconds apart, so rich's
        # short-window estimate swings.
        elapsed = task.finished_time if task.finished else task.elapsed
        if not elapsed or not task.completed:
            return "– tok/s"
        return f"{task.completed / elapsed:,.0f} tok/s"


class RichProgress:
    """Implements the api.Progress protocol with one bar per (task, pattern, ctx)."""

    def __init__(self, console: Console | None = None):
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(bar_width=20),
            MofNCompleteColumn(),
            TokensPerSecond(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=console or Console(stderr=True),
            transient=False,
        )
        self._task = None

    def __enter__(self):
        self._progress.start()
        return self

    def __exit__(self, *exc):
        self._progress.stop()

    def begin(self, label: str, total_tokens: int) -> None:
        self._task = self._progress.add_task(label, total=total_tokens)

    def advance(self, tokens: int) -> None:
        self._progress.advance(self._task, tokens)

    def end(self) -> None:
        self._progress.refresh()
