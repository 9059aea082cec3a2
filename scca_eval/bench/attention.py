"""Attention alone: each pattern's fast paths against SDPA's full causal attention.

For every length N and pattern this times each backend (FlexAttention, the
chunked and strided SDPA layouts, the packed varlen layout, or named FlexAttention
variants) on the tensors a transformers model hands to its attention function, the
forward alone (evaluation) and/or forward and backward (training), and divides the
time by the pattern's *ideal* time: its share of causal attention's FLOPs times the
time SDPA takes for full causal attention, measured in the same run and mode.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ..choices import ATTENTION_BENCH_PATTERNS
from ..errors import UserError
from ..patterns.masks import density
from ..patterns.spec import PatternSpec
from .timing import graph_time_ms, synchronize, time_ms

DEFAULT_PATTERNS = ATTENTION_BENCH_PATTERNS
BACKENDS = ("flex", "chunked", "strided", "strided-serial", "packed", "auto")
MODES = ("fwd", "fwd+bwd")

_SDA_RATE = re.compile(r"^sda[-_]r(\d+)$")


def pattern_from_label(label: str) -> PatternSpec:
    """A pattern name or mix; ``sda-rN`` is ``sda`` with dilation N."""
    from ..validation import resolve_pattern_spec

    match = _SDA_RATE.match(label.strip().lower())
    if match:
        return resolve_pattern_spec("sda", dilation=int(match.group(1)))
    return resolve_pattern_spec(label)


@dataclass
class AttentionRow:
    n: int
    pattern: str
    backend: str
    mode: str  # "fwd": the forward alone; "fwd+bwd": forward and backward (q, k and v gradients)
    flop_share: float  # share of causal attention's (query, key) pairs the pattern keeps
    ms: float | None  # median time of one call (CUDA events); None when the backend failed
    ideal_ms: float  # flop_share * SDPA causal time
    ratio: float | None  # ms / ideal_ms
    graph_ms: float | None  # the same call replayed from a CUDA graph: GPU time without launch overhead
    graph_ratio: float | None  # graph_ms / (flop_share * SDPA causal graph time)
    rel_error: float | None  # ||out - ref|| / ||ref|| against a float32 run of the chunked path
    first_call_s: float | None = None  # the first call, compilation and block masks included
    error: str | None = None


def _qkv(batch: int, heads: int, kv_heads: int, n: int, head_dim: int, dtype, device, seed: int = 0):
    """Random q, k, v in the memory layout transformers uses ([B, N, H, D] seen as [B, H, N, D])."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def make(h):
        x = torch.randn(batch, n, h, head_dim, generator=gen, device=device, dtype=dtype)
        return x.transpose(1, 2)

    return make(heads), make(kv_heads), make(kv_heads)


def _sdpa_causal(q, k, v, scaling):
    gqa = {"enable_gqa": True} if q.shape[1] != k.shape[1] else {}
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, **gqa)


def _sdpa_backend_times(q, k, v, scaling, device, warmup, repeats) -> dict[str, float | None]:
    """Causal SDPA time with each kernel forced (None where a kernel refuses the inputs)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    times: dict[str, float | None] = {}
    for name in ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION"):
        backend = getattr(SDPBackend, name, None)
        if backend is None:
            continue
        try:
            with sdpa_kernel(backend):
                times[name.lower()] = time_ms(lambda: _sdpa_causal(q, k, v, scaling), device,
                                              warmup=warmup, repeats=repeats)
        except RuntimeError:
            times[name.lower()] = None
    return times


def _backend_fn(name: str, flex_variants: dict[str, dict]) -> Callable:
    from ..attention.chunked import chunked_pattern_attention
    from ..attention.dispatch import pattern_attention

    if name == "chunked":
        return chunked_pattern_attention
    if name in ("strided", "strided-serial"):
        from ..attention.strided import strided_pattern_attention

        if name == "strided-serial":  # every call on the caller's stream, in order
            return lambda q, k, v, spec, scaling: strided_pattern_attention(q, k, v, spec, scaling, streams=1)
        return strided_pattern_attention
    if name == "packed":
        from ..attention.packed import packed_pattern_attention

        return packed_pattern_attention
    if name == "auto":
        return lambda q, k, v, spec, scaling: pattern_attention(q, k, v, spec, scaling, backend="auto")
    if name == "flex" or name in flex_variants:
        from ..attention.flex import flex_pattern_attention

        options = dict(flex_variants.get(name, {}))
        if options.pop("contiguous", False):  # copy to [B, H, N, D] first (the copies are timed too)
            return lambda q, k, v, spec, scaling: flex_pattern_attention(
                q.contiguous(), k.contiguous(), v.contiguous(), spec, scaling, **options)
        return lambda q, k, v, spec, scaling: flex_pattern_attention(q, k, v, spec, scaling, **options)
    raise UserError(f"unknown attention backend {name!r}; choose from {', '.join(BACKENDS + tuple(flex_variants))}")


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref).norm() / ref.norm())


def _with_backward(fn: Callable, q, k, v, grad_out) -> Callable:
    """fn(q, k, v, spec, scaling) followed by the backward pass to q, k and v (leaf copies)."""
    leaves = tuple(x.detach().requires_grad_() for x in (q, k, v))

    def step(spec, scaling):
        out = fn(*leaves, spec, scaling)
        torch.autograd.grad(out, leaves, grad_out)
        return out.detach()

    return step


def attention_bench(ns: Sequence[int] = (8192, 32768), heads: int = 32, head_dim: int = 128,
                    patterns: Sequence[str] | None = None, dtype: torch.dtype = torch.bfloat16, *,
                    kv_heads: int | None = None, batch: int = 1, backends: Sequence[str] = ("flex", "chunked"),
                    flex_variants: dict[str, dict] | None = None, device: torch.device | str | None = None,
                    modes: Sequence[str] = ("fwd",), warmup: int = 3, repeats: int = 20, check: bool = True,
                    graphs: bool = True, log: Callable[[str], None] | None = print) -> dict:
    """Time each pattern's fast paths at each length against SDPA causal attention.

    patterns:      labels for ``pattern_from_label`` (default: every sparse preset,
                   ``sda`` with r = 2 and r = 4).
    backends:      ``flex``, ``chunked``, ``strided``, ``strided-serial`` (``strided``
                   with every call on one stream), ``packed`` (one varlen call per layer),
                   ``auto`` (what a model would use) and the names of ``flex_variants``
                   ({name: keyword arguments of flex_pattern_attention}, e.g. other block
                   sizes or kernel options; ``contiguous: True`` copies the inputs to
                   [B, H, N, D] first).
    modes:         ``fwd`` (the forward alone) and/or ``fwd+bwd`` (forward, then the
                   backward pass to q, k and v), each against SDPA in the same mode.
    check:         also compare every output with a float32 run of the chunked path.
    graphs:        on CUDA, also time each forward replayed from a CUDA graph (GPU time
                   without the host's launch overhead), against SDPA's graph time.
    Returns a dict with the settings, SDPA's causal times per length (and mode) and one
    row per (length, pattern, backend, mode) (see AttentionRow); ``markdown_attention``
    turns it into tables.
    """
    device = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    kv_heads = heads if kv_heads is None else kv_heads
    flex_variants = dict(flex_variants or {})
    unknown = [mode for mode in modes if mode not in MODES]
    if unknown:
        raise UserError(f"unknown mode {unknown[0]!r}; choose from {', '.join(MODES)}")
    labels = list(patterns or DEFAULT_PATTERNS)
    specs = {label: pattern_from_label(label) for label in labels}
    fns = {name: _backend_fn(name, flex_variants) for name in backends}
    scaling = head_dim ** -0.5
    say = log or (lambda _text: None)
    from ..attention.auto import pattern_key

    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).replace("torch.", ""), "batch": batch, "heads": heads, "kv_heads": kv_heads,
        "head_dim": head_dim, "torch": torch.__version__, "layout": "[B, N, H, D] transposed (as transformers)",
        "flex_variants": {name: {k: (list(v) if isinstance(v, tuple) else v) for k, v in opts.items()}
                          for name, opts in flex_variants.items()},
        "modes": list(modes), "pattern_keys": {label: pattern_key(spec) for label, spec in specs.items()},
        "sdpa_causal_ms": {}, "sdpa_causal_fwd_bwd_ms": {}, "sdpa_backends_ms": {}, "rows": [],
    }
    for n in ns:
        q, k, v = _qkv(batch, heads, kv_heads, n, head_dim, dtype, device, seed=n)
        grad_out = _qkv(batch, heads, heads, n, head_dim, dtype, device, seed=n + 1)[0]
        causal_ms = time_ms(lambda: _sdpa_causal(q, k, v, scaling), device, warmup=warmup, repeats=repeats)
        causal_graph_ms = graph_time_ms(lambda: _sdpa_causal(q, k, v, scaling), device, repeats=repeats)
        result["sdpa_causal_ms"][n] = causal_ms
        result.setdefault("sdpa_causal_graph_ms", {})[n] = causal_graph_ms
        ideal_base = {"fwd": causal_ms}
        if "fwd+bwd" in modes:
            causal_step = _with_backward(lambda q, k, v, spec, scaling: _sdpa_causal(q, k, v, scaling),
                                         q, k, v, grad_out)
            ideal_base["fwd+bwd"] = result["sdpa_causal_fwd_bwd_ms"][n] = time_ms(
                lambda: causal_step(None, scaling), device, warmup=warmup, repeats=repeats)
        if device.type == "cuda":
            result["sdpa_backends_ms"][n] = _sdpa_backend_times(q, k, v, scaling, device, warmup, repeats)
        say(f"N={n}: SDPA causal {causal_ms:.3f} ms" + (
            f", forward and backward {ideal_base['fwd+bwd']:.3f} ms" if "fwd+bwd" in ideal_base else ""))
        for label, spec in specs.items():
            share = density(spec, n, heads)
            reference = None
            if check:
                from ..attention.chunked import chunked_pattern_attention

                reference = chunked_pattern_attention(q.float(), k.float(), v.float(), spec, scaling)
            for mode in modes:
                ideal = share * ideal_base[mode]
                for name, fn in fns.items():
                    step = ((lambda spec, scaling, fn=fn: fn(q, k, v, spec, scaling)) if mode == "fwd"
                            else _with_backward(fn, q, k, v, grad_out))
                    row = AttentionRow(n, label, name, mode, share, None, ideal, None, None, None, None)
                    try:
                        begin = time.perf_counter()
                        out = step(spec, scaling)
                        synchronize(device)
                        row.first_call_s = time.perf_counter() - begin
                        if reference is not None:
                            row.rel_error = _relative_error(out, reference)
                        del out
                        row.ms = time_ms(lambda: step(spec, scaling), device, warmup=warmup, repeats=repeats)
                        row.ratio = row.ms / ideal
                        if graphs and causal_graph_ms and mode == "fwd":
                            row.graph_ms = graph_time_ms(lambda: step(spec, scaling), device, repeats=repeats)
                            if row.graph_ms is not None:
                                row.graph_ratio = row.graph_ms / (share * causal_graph_ms)
                    except Exception as error:  # a kernel that fails to compile or run is reported, not fatal
                        row.error = f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
                    result["rows"].append(asdict(row))
                    graph = f", graph {row.graph_ms:.3f} ms = {row.graph_ratio:.2f}x" if row.graph_ms else ""
                    shown = (f"{row.ms:.3f} ms = {row.ratio:.2f}x ideal{graph} (first call {row.first_call_s:.1f} s, "
                             f"rel. error {row.rel_error if row.rel_error is not None else float('nan'):.1e})"
                             if row.ms is not None else row.error)
                    say(f"  {label:<11} {mode:<7} {name:<14} share {share:.3f}  {shown}")
            del reference
        del q, k, v, grad_out
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return result


def best_rows(result: dict) -> list[dict]:
    """The fastest backend of each (length, pattern, mode)."""
    best: dict[tuple, dict] = {}
    for row in result["rows"]:
        if row["ms"] is None:
            continue
        key = (row["n"], row["pattern"], row.get("mode", "fwd"))
        if key not in best or row["ms"] < best[key]["ms"]:
            best[key] = row
    return list(best.values())


def markdown_attention(result: dict) -> str:
    """One table per length and mode: rows = patterns, a column per backend (ms and x ideal)."""
    backends = list(dict.fromkeys(row["backend"] for row in result["rows"]))
    lines = [f"Attention alone: batch {result['batch']}, {result['heads']} heads "
             f"({result['kv_heads']} key/value), head dim {result['head_dim']}, {result['dtype']}, "
             f"{result['device']}, torch {result['torch']}. Cells: median ms of one call (time / ideal time); "
             "for the forward on CUDA then the same from a CUDA graph replay (GPU time without launch "
             "overhead, against SDPA's graph time).", ""]
    for key, causal in result["sdpa_causal_ms"].items():
        n = int(key)  # JSON turns the length keys into strings

        def at(table, default=None):
            return table.get(key, table.get(n, table.get(str(n), default)))

        extra = at(result["sdpa_backends_ms"], {})
        forced = ", ".join(f"{name} {ms:.3f}" for name, ms in extra.items() if ms is not None)
        graph = at(result.get("sdpa_causal_graph_ms", {}))
        for mode in result.get("modes", ["fwd"]):
            if mode == "fwd":
                lines.append(f"N = {n}, forward: SDPA full causal {causal:.3f} ms"
                             + (f", {graph:.3f} ms from a CUDA graph" if graph else "")
                             + (f" (forced kernels: {forced} ms)" if forced else ""))
            else:
                lines.append(f"N = {n}, forward and backward: SDPA full causal "
                             f"{at(result.get('sdpa_causal_fwd_bwd_ms', {}), float('nan')):.3f} ms")
            lines.append("")
            lines.append("| pattern | FLOP share | ideal ms | " + " | ".join(backends) + " | best |")
            lines.append("| --- | ---: | ---: | " + " | ".join("---:" for _ in backends) + " | --- |")
            rows = [row for row in result["rows"] if row["n"] == n and row.get("mode", "fwd") == mode]
            for pattern in dict.fromkeys(row["pattern"] for row in rows):
                lines.append(_pattern_line(pattern, {row["backend"]: row for row in rows if row["pattern"] == pattern},
                                           backends))
            lines.append("")
    return "\n".join(lines)


def _pattern_line(pattern: str, cells: dict[str, dict], backends: list[str]) -> str:
    first = next(iter(cells.values()))
    shown = []
    for backend in backends:
        row = cells.get(backend)
        if row is None or row["ms"] is None:
            shown.append("–")
            continue
        cell = f"{row['ms']:.3f} ({row['ratio']:.2f}x)"
        if row.get("graph_ms"):
            cell += f" / {row['graph_ms']:.3f} ({row['graph_ratio']:.2f}x)"
        shown.append(cell)
    timed = [row for row in cells.values() if row["ms"] is not None]
    best = min(timed, key=lambda row: row["ms"]) if timed else None
    best_text = f"{best['backend']} {best['ratio']:.2f}x" if best else "–"
    graphed = [row for row in timed if row.get("graph_ms")]
    if graphed:
        best_graph = min(graphed, key=lambda row: row["graph_ms"])
        best_text += f" / {best_graph['backend']} {best_graph['graph_ratio']:.2f}x"
    return (f"| {pattern} | {first['flop_share']:.3f} | {first['ideal_ms']:.3f} | "
            + " | ".join(shown) + f" | {best_text} |")
