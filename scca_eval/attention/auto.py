"""What ``--attention-backend auto`` runs a sparse pattern on: measurements first, then a rule.

On a CUDA GPU, auto looks the case up in ``backend_table.json`` beside this file: the
fastest backend that ``scca-eval bench attention --write-table`` measured per device kind
(``cuda-sm90`` for an H100 or H200), head shape (query heads, key/value heads, head
dimension), window length, pattern, and forward alone (evaluation) or forward and
backward (training). A measurement at length ``n`` answers for lengths from ``n / 2`` to
``2 n`` (the nearest measured length wins). Where the table has no answer, or names a
backend that cannot take the inputs, the rule decides:

- forward alone (evaluation) on CUDA: ``strided``, which the benchmarks found faster than
  ``packed`` for a forward at long windows (benchmarks/README.md, "Twelfth round");
- forward and backward (training) on CUDA: ``packed`` where FlashAttention's varlen kernel
  takes the inputs (fp16 or bf16, head dimension a multiple of 8 up to 256, this PyTorch
  has ``varlen_attn``): one kernel call per layer, whose backward is one call too; else
  ``strided``;
- ``chunked`` off CUDA (no table there).

The full pattern always runs on SDPA (dispatch.py).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError
from ..files import atomic_write_text
from ..patterns.spec import PatternSpec
from .packed import varlen_available, varlen_supported

TABLE_PATH = Path(__file__).with_name("backend_table.json")
# The backends a measurement may choose (what dispatch runs under these names).
TABLE_BACKENDS = ("packed", "strided", "chunked", "flex")
MODES = ("fwd", "fwd+bwd")
# A measured length answers for lengths within this factor of it.
LENGTH_REACH = 2.0


@dataclass(frozen=True)
class Case:
    """What auto chooses for: one attention call's inputs."""

    device_kind: str
    heads: int
    kv_heads: int
    head_dim: int
    n: int
    pattern: str  # pattern_key(spec)
    mode: str  # "fwd" or "fwd+bwd"


def device_kind(device: torch.device) -> str:
    """``cuda-sm90`` for a compute-capability 9.0 GPU; the device type elsewhere."""
    if device.type != "cuda":
        return device.type
    major, minor = torch.cuda.get_device_capability(device)
    return f"cuda-sm{major}{minor}"


def pattern_key(spec: PatternSpec) -> str:
    """The pattern as the table knows it: its head groups and chunk setting (not its name)."""
    chunk = f"G={spec.chunk_size}" if spec.chunk_size is not None else f"G=N*{spec.chunk_ratio}"
    return f"{spec.canonical()} @ {chunk}"


def mode_of(*tensors: torch.Tensor) -> str:
    """``fwd+bwd`` when autograd will need a backward through the call, else ``fwd``."""
    return "fwd+bwd" if torch.is_grad_enabled() and any(t.requires_grad for t in tensors) else "fwd"


# -- the table ------------------------------------------------------------------------
def empty_table() -> dict:
    return {"about": "Fastest attention backend per case, written by `scca-eval bench attention --write-table`; "
                     "read by --attention-backend auto (scca_eval/attention/auto.py).",
            "entries": []}


def read_table(path: str | os.PathLike = TABLE_PATH) -> dict:
    """The table at ``path`` (an empty one where there is no file)."""
    path = Path(path)
    if not path.exists():
        return empty_table()
    try:
        table = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise UserError(f"{path} is not a backend table ({error}); delete it or restore it from the package") from None
    if not isinstance(table, dict) or not isinstance(table.get("entries"), list):
        raise UserError(f"{path} is not a backend table (no 'entries' list); delete it or restore it from the package")
    return table


_TABLE = read_table()  # read once, at import: auto's lookups then touch no file


def table_choice(case: Case, entries: list[dict]) -> str | None:
    """The measured backend of ``case``: the entry of the nearest length within LENGTH_REACH, or None."""
    best, best_distance = None, math.log2(LENGTH_REACH)
    for entry in entries:
        if (entry.get("device"), entry.get("heads"), entry.get("kv_heads"), entry.get("head_dim"),
                entry.get("pattern"), entry.get("mode")) != (case.device_kind, case.heads, case.kv_heads,
                                                             case.head_dim, case.pattern, case.mode):
            continue
        distance = abs(math.log2(case.n / entry["n"]))
        if distance <= best_distance:
            best, best_distance = entry["backend"], distance
    return best


def fallback_choice(device: torch.device, varlen_ok: bool, mode: str) -> str:
    """The rule where nothing was measured (see the module docstring)."""
    if device.type != "cuda":
        return "chunked"
    return "packed" if varlen_ok and mode == "fwd+bwd" else "strided"


_choices: dict = {}
_length_to_choose_for: int | None = None  # set by choosing_for_length


@contextlib.contextmanager
def choosing_for_length(n: int):
    """Within this block auto chooses as if every window had ``n`` tokens, whatever the inputs'
    length: the training step's memory probes run short windows and must run the kernel that
    the whole window will, since kernels keep different tensors for the backward pass."""
    global _length_to_choose_for
    previous, _length_to_choose_for = _length_to_choose_for, n
    try:
        yield
    finally:
        _length_to_choose_for = previous


def choose(spec: PatternSpec, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str:
    """auto's backend for a sparse ``spec`` on these inputs (cached per case)."""
    mode = mode_of(q, k, v)
    n = _length_to_choose_for or q.shape[2]
    # keyed by the spec object (id, held in the entry): a plain read that torch.compile
    # traces without a break, where it cannot compare two specs by value
    key = (id(spec), q.device, q.dtype, q.shape[1], k.shape[1], q.shape[-1], n, mode)
    hit = _choices.get(key)
    if hit is not None and hit[0] is spec:
        return hit[1]
    chosen = _decide(spec, q, k, n, mode, _TABLE["entries"])
    if len(_choices) > 1024:  # many patterns in one process: start over rather than grow
        _choices.clear()
    _choices[key] = (spec, chosen)
    return chosen


def _decide(spec: PatternSpec, q: torch.Tensor, k: torch.Tensor, n: int, mode: str, entries: list[dict]) -> str:
    if q.device.type != "cuda":
        return "chunked"
    varlen_ok = varlen_supported(q)
    case = Case(device_kind(q.device), q.shape[1], k.shape[1], q.shape[-1], n, pattern_key(spec), mode)
    measured = table_choice(case, entries)
    if measured == "packed" and not varlen_ok:  # measured in bf16; these inputs take no FlashAttention
        measured = None
    return measured if measured in TABLE_BACKENDS else fallback_choice(q.device, varlen_ok, mode)


def rule_without_inputs(device: torch.device) -> str:
    """The rule's answer when only the device is known (no dtype, head dimension or mode:
    it answers as for training, the case that can take either kernel)."""
    return fallback_choice(device, device.type == "cuda" and varlen_available(), "fwd+bwd")


# -- writing the table ------------------------------------------------------------------
def entries_from_bench(result: dict, kind: str) -> list[dict]:
    """One entry per (length, pattern, mode) of a `bench attention` result: its fastest
    table backend by median time of one call (CUDA events, launch overhead included)."""
    best: dict[tuple, dict] = {}
    for row in result["rows"]:
        if row["ms"] is None or row["backend"] not in TABLE_BACKENDS:
            continue
        key = (row["n"], row["pattern"], row.get("mode", "fwd"))
        best.setdefault(key, {})[row["backend"]] = row["ms"]
    entries = []
    for (n, label, mode), times in best.items():
        entries.append({
            "device": kind, "device_name": result["device"], "heads": result["heads"],
            "kv_heads": result["kv_heads"], "head_dim": result["head_dim"], "n": n,
            "pattern": result["pattern_keys"][label], "label": label, "mode": mode,
            "backend": min(times, key=times.get), "ms": {name: round(ms, 4) for name, ms in times.items()},
            "dtype": result["dtype"], "torch": result["torch"],
        })
    return entries


def _case_of(entry: dict) -> tuple:
    return tuple(entry.get(name) for name in ("device", "heads", "kv_heads", "head_dim", "n", "pattern", "mode"))


def merge_entries(table: dict, new: list[dict]) -> dict:
    """``table`` with ``new`` entries merged in, case by case. Times measured on the same GPU
    (same device name) combine, a backend's new time replacing its old one, so that runs
    timing different backends add up; an entry from another GPU is replaced."""
    merged_entries = {_case_of(entry): entry for entry in table.get("entries", [])}
    for entry in new:
        old = merged_entries.get(_case_of(entry))
        if old is not None and old.get("device_name") == entry.get("device_name"):
            times = {**old.get("ms", {}), **entry["ms"]}
            entry = {**entry, "ms": times, "backend": min(times, key=times.get)}
        merged_entries[_case_of(entry)] = entry
    merged = dict(table)
    merged["entries"] = sorted(merged_entries.values(), key=lambda e: tuple(str(x) for x in _case_of(e)))
    return merged


def write_table(path: str | os.PathLike, result: dict, kind: str) -> int:
    """Merge a `bench attention` result into the table at ``path``; returns the entries written."""
    new = entries_from_bench(result, kind)
    atomic_write_text(Path(path), json.dumps(merge_entries(read_table(path), new), indent=1) + "\n")
    return len(new)
