"""``--gpus N`` and torchrun for the commands that run data parallel (``ppl``, ``finetune``).

One process per GPU: ``--gpus N`` starts the same command again under torchrun, without
``--gpus``. Every process checks the same input, so an error of the input is said once, by
rank 0; an error that only one rank meets is said by that rank, with its number.
"""

from __future__ import annotations

import os
import sys
import time
from typing import NoReturn

import click

from ..errors import UserError


def gpus_option(help: str):
    """``--gpus N``; ``help`` says how the N processes share the command's work."""
    return click.option("--gpus", type=int, default=None, help=help)


def start_processes(gpus: int | None, device: str | None) -> None:
    """With ``--gpus N`` (N > 1) outside torchrun: run this command line in N processes through
    torchrun and exit with their status. Under torchrun: check that ``--gpus`` matches the
    processes it started. Otherwise nothing happens."""
    from .. import distributed

    if gpus is None:
        return
    context = click.get_current_context()
    if not distributed.launched_by_torchrun():
        check_gpus(gpus, device)
        if gpus > 1:
            context.exit(distributed.launch(arguments_without_gpus(context), gpus))
        return
    world = int(os.environ["WORLD_SIZE"])
    if gpus != world:
        raise UserError(f"--gpus {gpus} does not match the {world} processes torchrun started; "
                        "leave --gpus out when starting with torchrun")


def check_gpus(gpus: int, device: str | None) -> None:
    """``--gpus`` against ``--device`` and the GPUs this machine has."""
    import torch

    command = click.get_current_context().info_name or "ppl"
    if gpus < 1:
        raise UserError(f"--gpus must be at least 1 (got {gpus})")
    if device is not None and device.strip().lower() != "cuda":
        raise UserError(f"--gpus runs one process per GPU and cannot take --device {device}; leave --device out")
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus > available:
        raise UserError(f"--gpus {gpus} asked for, but this machine has {available} CUDA GPU(s); for several "
                        f"CPU processes use torchrun --nproc-per-node N -m scca_eval {command} --device cpu ...")


def arguments_without_gpus(ctx: click.Context) -> list[str]:
    """The command line this command was started with, minus --gpus (for the processes)."""
    argv = list((ctx.find_root().obj or {}).get("argv") or sys.argv[1:])
    kept, skip = [], False
    for argument in argv:
        if skip:
            skip = False
        elif argument == "--gpus":
            skip = True
        elif not argument.startswith("--gpus="):
            kept.append(argument)
    return kept


def leave_input_errors_to_rank_zero() -> None:
    """Called while a bad-input error is handled: a process of a torchrun launch other than
    rank 0 exits with status 2 quietly (rank 0 meets the same input and says it); rank 0 and
    a lone process return, for the caller to re-raise."""
    from .. import distributed

    if distributed.launched_by_torchrun() and os.environ.get("RANK", "0") != "0":
        _exit_after_rank_zero()


def interrupted(ranks, error: KeyboardInterrupt) -> NoReturn:
    """Ctrl-C during a run: rank 0 says so for all (rather than click's bare "Aborted"), and
    every process exits with 130."""
    if ranks.is_main:
        click.echo(f"scca-eval: {error}" if str(error) else "scca-eval: interrupted", err=True)
    click.get_current_context().exit(130)


def rank_error(ranks, error: UserError) -> NoReturn:
    """A user error during a run: rank 0 raises it as it is; another rank exits quietly when
    rank 0 says the same line (``error.reported_by_main``), else raises it with its rank."""
    if ranks.is_main:
        raise error
    if getattr(error, "reported_by_main", False):
        _exit_after_rank_zero()
    raise UserError(f"rank {ranks.rank}: {error}") from None


# How long a quiet rank waits for rank 0 to say the error and exit; rank 0 meets the same
# input, so the wait normally ends within moments, when the launcher stops this process.
RANK_ZERO_GRACE_SECONDS = 60.0


def _exit_after_rank_zero() -> NoReturn:
    """Exit with status 2, but not before rank 0: the launcher stops every process as soon as
    one of them fails, so a quiet rank that left first could stop rank 0 before it printed
    the error line, leaving the user a bare status 2."""
    time.sleep(RANK_ZERO_GRACE_SECONDS)
    click.get_current_context().exit(2)
