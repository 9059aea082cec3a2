"""Data-parallel evaluation on ``torch.distributed``: ranks share the windows, rank 0 writes.

How a run is split (``torchrun --nproc-per-node N -m scca_eval ppl ...``, or
``scca-eval ppl --gpus N``, which starts torchrun itself):

* every process loads the model on its own device (``cuda:LOCAL_RANK`` with the NCCL
  backend, or the CPU with gloo), tokenizes the same task and plans the same windows;
* the windows are cut into batches exactly as a one-process run cuts them, and rank ``r``
  scores the batches ``r, r + N, r + 2N, ...``; so every window goes through the model in
  the same batch, with the same neighbours, as it would in one process;
* each rank puts its per-window NLL sums (float64) into an array of zeros as long as the
  window list and the arrays are summed over the ranks (``all_reduce``). Every window is
  scored by exactly one rank and ``x + 0.0 == x`` exactly, so the reduction is exact: the
  per-document sums are then added up in window order, as in one process.

So a distributed record equals a one-process record as exactly as the forward pass of one
batch repeats itself on another device or process. Tolerance: none on the CPU (the
per-document float64 sums are equal bit for bit; tested with two gloo processes). On GPUs
of one model, the difference is the run-to-run noise that repeating a one-GPU run shows
(cuBLAS and attention kernel choices, atomic adds of the per-window sums; see the record's
``runtime.determinism_note``): the last bits of the float64 sums when the forward pass
repeats itself exactly, the rounding noise of the compute dtype where a kernel choice
differs. ``benchmarks/data_parallel.py`` measures it on two GPUs.

Only rank 0 writes records and progress files and prints; the others print errors only.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .errors import UserError


@dataclass(frozen=True)
class Ranks:
    """Where this process stands in the run: rank ``rank`` of ``world_size`` processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  # "nccl" or "gloo"; None for a one-process run
    device: str = "cpu"  # where this rank's collective tensors live

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


SINGLE = Ranks()


def launched_by_torchrun() -> bool:
    """True inside a process that torchrun started with more than one process in all."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def _env_int(name: str) -> int:
    value = os.environ.get(name)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise UserError(f"the environment variable {name}={value!r} is not a whole number; "
                        "start distributed runs with torchrun or scca-eval ppl --gpus N") from None


def setup(device: str | None) -> tuple[Ranks, str | None]:
    """Join the process group that torchrun describes in the environment.

    Returns this process's :class:`Ranks` and the device to load the model on. Outside a
    torchrun launch (one process), nothing happens and ``device`` is returned unchanged.
    """
    if not launched_by_torchrun():
        return SINGLE, device
    import torch.distributed as dist

    if not dist.is_available():
        raise UserError("this PyTorch build has no torch.distributed; run without torchrun, or install a "
                        "PyTorch build with distributed support")
    rank, world_size, local_rank = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK")
    wanted = (device or ("cuda" if torch.cuda.is_available() else "cpu")).strip().lower()
    if wanted == "cpu":
        backend, rank_device = "gloo", "cpu"
    elif wanted == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda asked for, but CUDA is not available here: use --device cpu")
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"this node runs {int(os.environ.get('LOCAL_WORLD_SIZE', local_rank + 1))} processes "
                            f"but has {torch.cuda.device_count()} CUDA device(s): give --nproc-per-node "
                            f"{torch.cuda.device_count()} or fewer")
        backend, rank_device = "nccl", f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
    else:
        raise UserError(f"--device {device} cannot be used in a distributed run: each process takes "
                        "cuda:LOCAL_RANK; give --device cuda or --device cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return Ranks(rank, world_size, local_rank, backend, rank_device), rank_device


def current() -> Ranks:
    """The :class:`Ranks` of this process: from the initialized process group, else one process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return SINGLE
    backend = str(dist.get_backend())
    device = f"cuda:{torch.cuda.current_device()}" if backend == "nccl" else "cpu"
    local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    return Ranks(dist.get_rank(), dist.get_world_size(), local_rank, backend, device)


def teardown() -> None:
    """Leave the process group (every rank, at the end of a run)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------- sharing the work

def my_batches(batches: Sequence[Sequence[int]], ranks: Ranks) -> list[int]:
    """The window indices this rank scores: whole batches, round robin (batch ``i`` goes to
    rank ``i mod N``), in batch order, so that the engine cuts them into the same batches."""
    return [index for batch in batches[ranks.rank::ranks.world_size] for index in batch]


def sum_over_ranks(values: np.ndarray, ranks: Ranks) -> np.ndarray:
    """Element-wise sum of ``values`` over all ranks (the array itself in a one-process run).

    Used on arrays where each element is non-zero on at most one rank, so the sum is exact.
    """
    if not ranks.is_distributed:
        return values
    import torch.distributed as dist

    tensor = torch.from_numpy(np.ascontiguousarray(values)).to(ranks.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.cpu().numpy()


def share_from_main(value, ranks: Ranks):
    """Rank 0's ``value`` on every rank (e.g. the progress a resumed run starts from)."""
    if not ranks.is_distributed:
        return value
    import torch.distributed as dist

    box = [value if ranks.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_agree(flag: bool, ranks: Ranks) -> bool:
    """True when ``flag`` is true on every rank (e.g. "this rank did not run out of memory")."""
    if not ranks.is_distributed:
        return flag
    import torch.distributed as dist

    tensor = torch.tensor([0 if flag else 1], dtype=torch.int64, device=ranks.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return int(tensor.item()) == 0


# ---------------------------------------------------------------- launching

def launch(argv: Sequence[str], processes: int) -> int:
    """Run ``python -m scca_eval ARGV`` in ``processes`` processes on this machine through
    ``torch.distributed.run`` (torchrun's own code) and return the exit status to use:
    0 when all succeeded, else the status of the first process that failed (2 for bad
    input, 130 when interrupted). The processes print their own messages."""
    if processes < 1:
        raise UserError(f"the number of processes must be at least 1 (got {processes})")
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # torchrun would otherwise set one thread per process and say so in a banner.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    arguments = parse_args(["--standalone", "--nproc-per-node", str(processes), "-m", "scca_eval", *argv])
    # The launcher logs every failure and every stopped process with its own formatting;
    # the processes already said what went wrong, in one line each.
    elastic_log = logging.getLogger("torch.distributed.elastic")
    level = elastic_log.level
    elastic_log.setLevel(logging.CRITICAL)
    try:
        run(arguments)
    except ChildFailedError as error:
        _, failure = error.get_first_failure()
        code = failure.exitcode
        # A process killed by a signal has a negative exit code: report it as the shell would.
        return 128 - code if code < 0 else (code or 1)
    except KeyboardInterrupt:
        return 130
    except Exception as error:  # the launcher's SignalException (Ctrl-C, SIGTERM), rendezvous errors
        if type(error).__name__ == "SignalException":
            return 130
        print(f"scca-eval: error: could not start {processes} processes: {error}", file=sys.stderr)
        return 1
    finally:
        elastic_log.setLevel(level)
    return 0
