"""A rich progress bar that shows scored tokens, tokens/s and the time left."""

from __future__ import annotations

from datetime import timedelta

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn
from rich.table import Column
from rich.text import Text


def _rate(task) -> float | None:
    """Tokens per second of the work this run did: tokens read back from a progress file
    at the start (``task.fields['resumed']``) took no time here, so they are left out. An
    average over the whole cell, because batches arrive seconds to minutes apart (rich's
    own estimate needs several updates inside 30 s and shows nothing on long windows)."""
    elapsed = task.finished_time if task.finished else task.elapsed
    done_here = task.completed - task.fields.get("resumed", 0)
    if not elapsed or done_here <= 0:
        return None
    return done_here / elapsed


class RateAndTimeLeft(ProgressColumn):
    """'1,234 tok/s eta 0:12:34', from the first batch of the cell on."""

    def __init__(self):
        super().__init__(table_column=Column(no_wrap=True))

    def render(self, task):
        rate = _rate(task)
        if rate is None:
            return Text("– tok/s eta –")
        if task.finished:
            return Text(f"{rate:,.0f} tok/s done")
        left = max(0.0, (task.total or 0) - task.completed) / rate
        return Text(f"{rate:,.0f} tok/s eta {timedelta(seconds=round(left))}")


_BAR_WIDTH = 10


class RichProgress:
    """Implements the api.Progress protocol with one bar per (task, pattern, ctx).

    The counts, the rate and the time left never wrap; the label is shortened with '…'
    instead, so they stay visible in an 80-column terminal."""

    def __init__(self, console: Console | None = None, get_time=None):
        console = console or Console(stderr=True)
        # What the bar, the counts, the rate and the time left take at most, with padding.
        others = _BAR_WIDTH + 15 + 28 + 3
        label = Column(no_wrap=True, overflow="ellipsis", max_width=max(12, console.width - others))
        self._progress = Progress(
            TextColumn("{task.description}", table_column=label),
            BarColumn(bar_width=_BAR_WIDTH),
            MofNCompleteColumn(table_column=Column(no_wrap=True)),
            RateAndTimeLeft(),
            console=console,
            transient=False,
            get_time=get_time,
        )
        self._task = None
        self._started = False

    # The display starts with the first cell, so an error before it (bad data, a model that
    # does not load) leaves no empty progress line above its message.
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self._started:
            self._progress.stop()

    def begin(self, label: str, total_tokens: int, done_tokens: int = 0) -> None:
        if not self._started:
            self._progress.start()
            self._started = True
        self._task = self._progress.add_task(label, total=total_tokens, completed=done_tokens,
                                             resumed=done_tokens)

    def advance(self, tokens: int) -> None:
        self._progress.advance(self._task, tokens)

    def end(self) -> None:
        self._progress.refresh()
