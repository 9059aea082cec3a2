"""A rich progress bar for fine-tuning: steps, the last loss, the last validation loss and tokens/s."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class TrainingBar:
    """Implements training.run.TrainingProgress with one bar over the run's steps."""

    def __init__(self, console: Console | None = None):
        self._progress = Progress(
            TextColumn("{task.description}"), BarColumn(bar_width=20), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("val {task.fields[val]}"),
            TextColumn("{task.fields[speed]}"),
            TextColumn("eta"), TimeRemainingColumn(),
            console=console or Console(stderr=True), transient=False,
        )
        self._task = None
        self._tokens = 0
        self._seconds = 0.0

    def begin(self, label: str, total_steps: int, done_steps: int) -> None:
        self._progress.start()
        self._task = self._progress.add_task(label, total=total_steps, completed=done_steps,
                                             loss="–", val="–", speed="– tok/s")

    def step(self, result: dict) -> None:
        # Average over the steps of this process: single steps swing with the data.
        self._tokens += result["tokens"]
        self._seconds += result["seconds"]
        speed = f"{self._tokens / self._seconds:,.0f} tok/s" if self._seconds > 0 else "– tok/s"
        self._progress.update(self._task, advance=1, loss=f"{result['loss']:.4f}", speed=speed)

    def validation(self, entry: dict) -> None:
        self._progress.update(self._task, val=f"{entry['loss']:.4f} @{entry['step']}")

    def end(self) -> None:
        self._progress.stop()
