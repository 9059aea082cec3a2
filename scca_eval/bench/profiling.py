"""Where a profiled step's GPU time goes, kernel class by kernel class, and what that bounds.

``profile_step`` runs one call under torch.profiler and returns the host's busy time,
the GPU's busy time (the union of its kernels' intervals, so overlapping streams count
once), and that time split into kernel classes by kernel name:

- ``attention``: attention kernels (FlashAttention and SDPA's other fused kernels, the
  varlen kernel of the packed backend, FlexAttention's Triton templates);
- ``matmul``: matrix multiplies (cuBLAS, CUTLASS and Triton GEMMs);
- ``layout``: kernels that only move data (copies, gathers, scatters, concatenation,
  memset): what the sparse backends add to put tokens into their kernels' order and back;
- ``other``: everything else (norms, activations, RoPE, the loss, the optimizer).

``speed_bounds`` turns a pattern's breakdown and full attention's into the question the
speed goals ask: how fast against full attention could this step be if its attention
kernels ran at their ideal time (full attention's kernel time times the pattern's FLOP
share), how fast the pattern could be at all (full attention's step with only its
attention made that much cheaper), and this step with attention costing nothing. A goal
above the second figure cannot be met at this shape by any implementation of the pattern.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable

import torch

from ..errors import UserError

KERNEL_CLASSES = ("attention", "matmul", "layout", "other")
# The profiler's name for each entry into torch.compile'd code ("Torch-Compiled Region: 1/0").
COMPILED_REGION = "Torch-Compiled Region"

# Checked in this order: an attention kernel built on CUTLASS is attention, not a matmul.
# Names are matched lowercased.
_PATTERNS = {
    "attention": re.compile(r"flash|fmha|flex_attention|sdpa|attention|attn"),
    "matmul": re.compile(r"gemm|cutlass|xmma|nvjet|cublas|matmul|splitk|sm90_|sm80_"),
    "layout": re.compile(r"copy|clone|index|gather|scatter|catarray|concat|memcpy|memset|transpose|permute|fill"),
}
# Compiled graphs name a kernel after the ops it fuses (triton_poi_fused__to_copy_add_mul_0):
# such a kernel only moves data when every word of its name is a data-moving op's.
_TRITON_PREFIX = re.compile(r"^triton_(poi|red|per|tem)_(fused_)?")
_LAYOUT_WORDS = frozenset("to copy clone index select gather scatter cat view permute transpose unsqueeze "
                          "squeeze expand slice constant pad zeros new empty fill full like unsafe reshape "
                          "contiguous as strided repeat interleave split".split())


def classify_kernel(name: str) -> str:
    """The kernel class of a GPU kernel's name (one of KERNEL_CLASSES)."""
    lowered = name.lower()
    fused = _TRITON_PREFIX.match(lowered)
    if fused:
        words = [word for word in lowered[fused.end():].split("_") if word and not word.isdigit()]
        if "flex" in words or fused.group(1) == "tem" and not {"mm", "bmm", "addmm"} & set(words):
            return "attention"  # FlexAttention's templates (forward and backward)
        if {"mm", "bmm", "addmm"} & set(words):
            return "matmul"
        return "layout" if words and all(word in _LAYOUT_WORDS for word in words) else "other"
    for kind, pattern in _PATTERNS.items():
        if pattern.search(lowered):
            return kind
    return "other"


def _union_ms(intervals: list[tuple[float, float]]) -> float:
    """Total length (ms) of the union of [start, end) intervals given in microseconds."""
    total, reach = 0.0, None
    for start, end in sorted(intervals):
        if reach is None or start > reach:
            total += end - start
            reach = end
        elif end > reach:
            total += end - reach
            reach = end
    return total / 1000


def kernel_breakdown(kernels: list[tuple[str, float, float]], top: int = 5) -> dict:
    """Busy time and per-class time (ms) of GPU kernels given as (name, start µs, end µs).

    ``classes`` sums durations per class (streams that overlap count twice there);
    ``busy_ms`` is the union. ``top`` lists each class's longest kernels (name, ms, calls)
    so that the classification can be checked by eye.
    """
    classes = {kind: 0.0 for kind in KERNEL_CLASSES}
    per_name: dict[str, list[float]] = {}
    for name, start, end in kernels:
        duration = (end - start) / 1000
        classes[classify_kernel(name)] += duration
        entry = per_name.setdefault(name, [0.0, 0])
        entry[0] += duration
        entry[1] += 1
    longest = {kind: [] for kind in KERNEL_CLASSES}
    for name, (ms, calls) in sorted(per_name.items(), key=lambda item: -item[1][0]):
        kind = classify_kernel(name)
        if len(longest[kind]) < top:
            longest[kind].append([name[:160], round(ms, 3), calls])
    return {"busy_ms": _union_ms([(start, end) for _, start, end in kernels]), "classes": classes,
            "top": longest, "kernels": len(kernels)}


def make_profile_dir(folder: str | os.PathLike | None) -> Path | None:
    """The profile folder, made where missing (None stays None); one clear line where it cannot be."""
    if folder is None:
        return None
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot make the profile folder {folder}: {error.strerror or error}; "
                        "give --profile a folder that can be made") from None
    return folder


def profile_step(step: Callable[[], object], device: torch.device, path: Path | None = None) -> dict:
    """Run ``step`` once under torch.profiler (synchronized before and after).

    Returns host_ms (the profiler's host time summed over threads, with its own overhead),
    gpu_ms (kernel time summed), compiled_entries and compiled_regions (how often the step
    entered torch.compile'd code, and how many distinct compiled regions: a compiled layer
    that traced whole is one region entered once per call, a graph break adds regions),
    and on a GPU ``busy_ms``, ``classes`` and ``top`` as ``kernel_breakdown`` gives them.
    ``path``: the profiler's op tables and the breakdown, written atomically.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    on_gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    if on_gpu:
        torch.cuda.synchronize(device)
    with profile(activities=activities) as profiler:
        step()
        if on_gpu:
            torch.cuda.synchronize(device)
    events = profiler.key_averages()
    host_ms = sum(event.self_cpu_time_total for event in events) / 1000
    regions = [event for event in events if event.key.startswith(COMPILED_REGION)]
    result: dict = {"host_ms": host_ms, "gpu_ms": None, "compiled_entries": sum(event.count for event in regions),
                    "compiled_regions": len(regions)}
    text = (f"Compiled code entered {result['compiled_entries']} times, "
            f"{result['compiled_regions']} distinct compiled regions\n")
    if on_gpu:
        kernels = [(event.name, event.time_range.start, event.time_range.end) for event in profiler.events()
                   if event.device_type == DeviceType.CUDA and not event.is_user_annotation]
        result["gpu_ms"] = sum(end - start for _, start, end in kernels) / 1000
        result.update(kernel_breakdown(kernels))
        text += _breakdown_text(result) + "\nBy GPU time:\n"
        text += events.table(sort_by="self_device_time_total", row_limit=40) + "\n"
    # By host time always (where a step that waits on the host spends it).
    text += "By host time:\n" + events.table(sort_by="self_cpu_time_total", row_limit=40)
    if path is not None:
        partial = path.with_name(path.name + ".partial")
        partial.write_text(text)
        os.replace(partial, path)
        result["table"] = path.name
    return result


def _breakdown_text(profiled: dict) -> str:
    lines = [f"GPU busy {profiled['busy_ms']:.2f} ms over {profiled['kernels']} kernels; by class:"]
    for kind in KERNEL_CLASSES:
        lines.append(f"  {kind:<9} {profiled['classes'][kind]:9.2f} ms")
        for name, ms, calls in profiled["top"][kind]:
            lines.append(f"      {ms:9.3f} ms {calls:5d}x  {name}")
    return "\n".join(lines) + "\n"


def speed_bounds(step_ms: float, profiled: dict, full_step_ms: float, full_profiled: dict,
                 attention_share: float) -> dict:
    """How fast against full attention this step is, and could be with other attention kernels.

    attention_share: the pattern's attention FLOPs over full attention's. Returns
    ``vs_full`` (measured), ``ideal_attention_ms`` (full attention's kernel time × share),
    ``vs_full_ideal_attention`` (this step with its attention kernels replaced by that: what
    better kernels alone would give), ``vs_full_ideal_pattern`` (full attention's step with
    its attention at that time: the pattern with no cost beyond its FLOPs, no extra data
    movement or host waits) and ``vs_full_free_attention`` (this step with attention costing
    nothing).
    """
    attention = profiled["classes"]["attention"]
    full_attention = full_profiled["classes"]["attention"]
    ideal = full_attention * attention_share
    rest = step_ms - attention
    return {"vs_full": full_step_ms / step_ms,
            "ideal_attention_ms": ideal,
            "vs_full_ideal_attention": full_step_ms / (rest + ideal),
            "vs_full_ideal_pattern": full_step_ms / (full_step_ms - full_attention + ideal),
            "vs_full_free_attention": full_step_ms / max(rest, 1e-9)}


def _shape_limits(cells: list[dict]) -> str:
    """The most any pattern can gain at each profiled length: full attention's step
    without its attention kernels."""
    limits = [f"{cell['ctx']}: {cell['step_ms'] / (cell['step_ms'] - cell['profile']['classes']['attention']):.2f}x"
              for cell in cells if cell["pattern"] == "full" and "(baseline)" not in cell["backend"]
              and (cell.get("profile") or {}).get("busy_ms") is not None
              and cell["step_ms"] > cell["profile"]["classes"]["attention"]]
    return (" The most any pattern can gain over full attention here (its step without its attention "
            f"kernels): {', '.join(limits)}.") if limits else ""


def markdown_breakdown(cells: list[dict], what: str) -> str:
    """A table of profiled cells: each has ctx, pattern, backend, step_ms, profile and,
    for sparse patterns with a full-attention cell beside them, ``bounds``."""
    lines = [f"Where the GPU time of one profiled {what} goes (ms; classes by kernel name, "
             "`scca_eval/bench/profiling.py`; attention: measured (ideal: full attention's kernel time × the "
             "pattern's FLOP share)). *ideal attn*: this step with its attention kernels at their ideal time; "
             "*ideal pattern*: full attention's step with its attention at that time (no data movement or host "
             "waits beyond full attention's); *free attn*: this step with attention costing nothing."
             + _shape_limits(cells), "",
             "| ctx | pattern | backend | step | GPU busy | GPU idle | attention (ideal) | matmul | layout | other "
             "| vs full | vs full, ideal attn | ideal pattern | vs full, free attn |",
             "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for cell in cells:
        profiled = cell.get("profile") or {}
        if profiled.get("busy_ms") is None:
            continue
        classes = profiled["classes"]
        bounds = cell.get("bounds")

        def ratio(key):
            return f"{bounds[key]:.2f}x" if bounds else ""

        attention = f"{classes['attention']:.1f}" + (f" ({bounds['ideal_attention_ms']:.1f})" if bounds else "")
        lines.append(f"| {cell['ctx']} | {cell['pattern']} | {cell['backend']} | {cell['step_ms']:.1f} | "
                     f"{profiled['busy_ms']:.1f} | {max(0.0, cell['step_ms'] - profiled['busy_ms']):.1f} | "
                     f"{attention} | " + " | ".join(f"{classes[kind]:.1f}" for kind in KERNEL_CLASSES[1:])
                     + f" | {ratio('vs_full')} | {ratio('vs_full_ideal_attention')} | "
                     f"{ratio('vs_full_ideal_pattern')} | {ratio('vs_full_free_attention')} |")
    return "\n".join(lines) + "\n"
