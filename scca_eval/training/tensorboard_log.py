"""TensorBoard event files of a run (``--log-dir``), through torch's own SummaryWriter.

Scalars, against the optimizer step: ``train/loss``, ``train/lr``, ``train/grad_norm``,
``train/tokens_per_second`` (of that step) and ``validation/loss``. A resumed run passes
the step it resumes from as ``purge_step``, so TensorBoard drops what an earlier process
wrote after its last checkpoint (steps that were computed again).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import MissingDependency, UserError


def _summary_writer_class():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch's module needs the tensorboard package
        raise MissingDependency("tensorboard", "tensorboard", "--log-dir (TensorBoard logging)") from None
    return SummaryWriter


def check_log_dir(log_dir) -> Path:
    """Refuse, before any work, a missing tensorboard package or a log folder that is a file."""
    _summary_writer_class()
    folder = Path(log_dir).expanduser()
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--log-dir {log_dir} is a file; give a folder for the TensorBoard event files")
    return folder


class TensorBoardLog:
    """Writes the scalars of each step and validation point."""

    def __init__(self, log_dir, purge_step: int | None = None):
        self._writer = _summary_writer_class()(log_dir=str(check_log_dir(log_dir)), purge_step=purge_step)

    def step(self, result: dict) -> None:
        step = result["step"]
        self._writer.add_scalar("train/loss", result["loss"], step)
        self._writer.add_scalar("train/lr", result["lr"], step)
        self._writer.add_scalar("train/grad_norm", result["grad_norm"], step)
        if result["seconds"] > 0:
            self._writer.add_scalar("train/tokens_per_second", result["tokens"] / result["seconds"], step)

    def validation(self, entry: dict) -> None:
        self._writer.add_scalar("validation/loss", entry["loss"], entry["step"])

    def close(self) -> None:
        self._writer.close()
