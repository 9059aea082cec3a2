"""Whole-model throughput: the evaluation engine against a plain transformers loop.

``model_bench`` builds a model of a named shape with random weights (or loads a
real one), and for each (ctx, pattern) times

- ``engine``: ``scca_eval.evaluation.engine.score_windows`` over the default protocol's
  windows (loss only at scored positions, in chunks), and
- ``plain``:  the loop a user would write, ``model(input_ids, labels=...)`` per
  batch of the same windows (full logits, transformers' own loss, default
  settings otherwise),

in the same process, on the same random token ids, and reports forward and
scored tokens per second, achieved TFLOP/s and its share of the matrix-multiply
peak measured in the same run, and peak device memory. Both paths also report
their mean NLL, which must agree: they do the same work.
"""

from __future__ import annotations

import json
import os
import statistics
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from ..choices import PRESETS
from ..errors import UserError, is_out_of_memory
from ..patterns.masks import density
from .attention import pattern_from_label
from .profiling import make_profile_dir, markdown_breakdown, profile_step, speed_bounds
from .timing import matmul_peak_tflops, sustained_matmul_tflops, wall_s

# Public architecture figures of the named shapes (config.json of each model).
SHAPES: dict[str, dict] = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, rms_norm_eps=1e-5, rope_theta=10000.0),
    "llama2-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                       num_key_value_heads=40, vocab_size=32000, rms_norm_eps=1e-5, rope_theta=10000.0),
    "llama2-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                       num_key_value_heads=8, vocab_size=32000, rms_norm_eps=1e-5, rope_theta=10000.0),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, rms_norm_eps=1e-5, rope_theta=100000.0,
                         tie_word_embeddings=True),
}

DEFAULT_PATTERNS = PRESETS


# What a config file must give for the benchmark to build the model it describes.
SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


def random_model(shape: str | dict, *, device: torch.device, dtype: torch.dtype, max_ctx: int,
                 layers: int | None = None, seed: int = 0, rope_scaling: str | None = None,
                 original_ctx: int | None = None):
    """A LlamaForCausalLM of a named shape (or a config dict / config.json path) with random weights.

    The model is created directly on ``device`` (weights initialized there, no
    host copy), which takes seconds even for 13B shapes on a GPU. ``rope_scaling`` and
    ``original_ctx`` as for ``load_model``; the applied RoPE parameters end up in
    ``model.config.rope_parameters``.
    """
    from ..models import rope

    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    if isinstance(shape, dict):
        config = LlamaConfig(**_llama_kwargs(shape))
    elif shape in SHAPES:
        config = LlamaConfig(**_llama_kwargs(SHAPES[shape]))
    elif os.path.isfile(shape) and shape.endswith(".json"):
        try:
            with open(shape, encoding="utf-8") as handle:
                values = json.load(handle)
            config = AutoConfig.for_model(**values) if "model_type" in values else LlamaConfig(**values)
        except (ValueError, TypeError, KeyError) as error:
            raise UserError(f"{shape} is not a usable model config: {str(error).splitlines()[0]}") from None
        given = set(values) | {config.attribute_map.get(key, key) for key in values}  # "n_embd" gives hidden_size
        missing = [key for key in SHAPE_KEYS if key not in given]
        if missing:  # the defaults would build some other model, at full size
            raise UserError(f"{shape} lacks {', '.join(missing)}: give the config.json of a model, or a shape "
                            f"name ({', '.join(SHAPES)})")
    else:
        raise UserError(f"unknown model shape {shape!r}: use {', '.join(SHAPES)} or a config .json file")
    if layers is not None:
        config.num_hidden_layers = layers
    rope.apply_rope_scaling(config, rope.parse_rope_scaling(rope_scaling), original_ctx)
    config.max_position_embeddings = max(getattr(config, "max_position_embeddings", 0) or 0, max_ctx)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    rope.dynamic_rope_per_forward(model)
    return model.eval()


def _llama_kwargs(values: dict) -> dict:
    values = dict(values)
    theta = values.pop("rope_theta", None)
    if theta is not None:
        values["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
    return values


def bench_model(shape: str, *, device: torch.device, dtype: torch.dtype, max_ctx: int,
                layers: int | None = None, rope_scaling: str | None = None, original_ctx: int | None = None):
    """Random weights for a named shape or config file; otherwise a real model through load_model."""
    if shape in SHAPES or (isinstance(shape, str) and shape.endswith(".json")):
        return random_model(shape, device=device, dtype=dtype, max_ctx=max_ctx, layers=layers,
                            rope_scaling=rope_scaling, original_ctx=original_ctx), "random"
    from ..models import load_model

    model, _tokenizer = load_model(shape, dtype=dtype, device=device, rope_scaling=rope_scaling,
                                   original_ctx=original_ctx)
    return model.eval(), "loaded"


# -- FLOPs --------------------------------------------------------------------------
def _linear_params(model) -> tuple[int, int]:
    """(weights of every Linear except the LM head, weights of the LM head)."""
    head = model.get_output_embeddings()
    body = sum(m.weight.numel() for m in model.modules()
               if isinstance(m, torch.nn.Linear) and m is not head)
    return body, head.weight.numel()


def attention_flops(model, spec, n: int) -> float:
    """Attention FLOPs of one window of n tokens under ``spec`` (QK^T and PV, all layers)."""
    config = model.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    pairs = density(spec, n, heads) * n * (n + 1) / 2 * heads
    return 4.0 * head_dim * pairs * config.num_hidden_layers


@dataclass
class ModelRow:
    ctx: int
    pattern: str
    backend: str  # attention backend ("sdpa" for full)
    path: str  # engine | plain
    batch_size: int
    windows: int
    forward_tokens: int
    scored_tokens: int
    seconds: float | None
    forward_tokens_per_s: float | None
    scored_tokens_per_s: float | None
    tflops: float | None
    peak_share: float | None  # tflops / matmul peak
    peak_memory_gib: float | None
    mean_nll: float | None
    error: str | None = None
    times_s: list[float] | None = None  # every timed run, in the order run
    attention_flops: float | None = None  # of one timed run
    profile: dict | None = None  # one more engine run under the profiler (profiling.profile_step)
    kernel: str | None = None  # what the backend ran: for auto, its choice for this case (auto_kernel)


def _documents(ctx: int, windows: int, vocab: int, seed: int) -> list[np.ndarray]:
    """One random document that the default protocol cuts into exactly ``windows`` full windows."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=windows * (ctx - 1) + 1, dtype=np.int64)]


def _plain_loop(model, documents, windows, batch_size: int, device) -> tuple[float, int]:
    """``model(input_ids, labels=...)`` per batch; labels -100 on context tokens. (nll sum, tokens)."""
    nll, count = torch.zeros((), dtype=torch.float64, device=device), 0
    with torch.inference_mode():
        for first in range(0, len(windows), batch_size):
            rows = windows[first:first + batch_size]
            ids = torch.from_numpy(np.stack([documents[w.doc][w.start:w.end] for w in rows])).to(device)
            labels = ids.clone()
            for row, w in enumerate(rows):
                labels[row, :w.score_from - w.start] = -100
            scored = sum(w.end - w.score_from for w in rows)
            loss = model(input_ids=ids, labels=labels).loss
            nll += loss.double() * scored
            count += scored
    return float(nll), count


def _peak_memory(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def model_bench(shape: str = "llama2-7b", ctxs: Sequence[int] = (8192, 32768),
                patterns: Sequence[str] = DEFAULT_PATTERNS, batch_size: int | None = None, *,
                backends: Sequence[str] = ("auto",), device: torch.device | str | None = None,
                dtype: torch.dtype | None = None, tokens_per_run: int = 32768, repeats: int = 2,
                plain: bool = True, compile: bool = False, layers: int | None = None, seed: int = 0,
                rope_scaling: str | None = None, original_ctx: int | None = None,
                profile_dir: str | os.PathLike | None = None, log: Callable[[str], None] | None = print) -> dict:
    """Engine and plain-loop throughput of one model for each ctx and pattern.

    shape:          ``llama2-7b``, ``llama2-13b``, ``smollm2-135m`` or a config .json
                    (random weights), or anything ``load_model`` takes (a real model).
    patterns:       pattern labels (``sda-rN`` = sda with dilation N); ``full`` runs
                    transformers' SDPA attention, the others each backend of ``backends``.
    batch_size:     windows per forward (default: the engine's automatic choice).
    tokens_per_run: about this many tokens per timed run (at least one window).
    repeats:        timed runs of each path after one warm-up run, the paths taking
                    turns (engine, plain, engine, ...) so that drifting clocks
                    affect both alike; the median is reported.
    plain:          also time the plain transformers loop.
    compile:        the engine runs compiled (``compile_for_evaluation``, as
                    ``ppl --compile``); the plain loop stays eager.
    layers:         override the number of layers (quick checks).
    rope_scaling:   ``--rope-scaling`` value (with ``original_ctx``), as for ``load_model``;
                    the result names the RoPE parameters the model ran with.
    profile_dir:    a folder for one more engine run of each cell under torch.profiler
                    (``CTX-PATTERN-BACKEND.txt``); the row gets that run's GPU time by kernel
                    class (``profiling.profile_step``).
    """
    from ..evaluation.engine import auto_batch_size, compile_for_evaluation, score_windows
    from ..evaluation.windows import plan_windows

    device = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    say = log or (lambda _text: None)
    specs = {label: pattern_from_label(label) for label in patterns}
    from ..attention.dispatch import BACKENDS

    unknown = [name for name in backends if name not in BACKENDS]
    if unknown:
        raise UserError(f"unknown attention backend {unknown[0]!r}; choose from {', '.join(BACKENDS)}")

    profile_dir = make_profile_dir(profile_dir)
    model, origin = bench_model(shape, device=device, dtype=dtype, max_ctx=max(ctxs), layers=layers,
                                rope_scaling=rope_scaling, original_ctx=original_ctx)
    if compile:
        compile_for_evaluation(model)
    body_params, head_params = _linear_params(model)
    matmul_size = 8192 if device.type == "cuda" else 1024
    peak = matmul_peak_tflops(device, dtype=dtype, size=matmul_size)
    sustained = sustained_matmul_tflops(device, dtype=dtype, size=matmul_size)
    say(f"model {shape} ({origin} weights, {(body_params + head_params) / 1e9:.3f}B matmul parameters, "
        f"{dtype}); matrix-multiply peak {_num(peak)} TFLOP/s"
        + (f", sustained {_num(sustained)} TFLOP/s" if sustained else "")
        + (" ; engine compiled" if compile else ""))
    result = {
        "shape": shape, "weights": origin, "dtype": str(dtype).replace("torch.", ""),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "transformers": _transformers_version(),
        "matmul_params": body_params + head_params, "matmul_peak_tflops": peak,
        "matmul_sustained_tflops": sustained, "matmul_size": matmul_size, "compiled": compile,
        "tokens_per_run": tokens_per_run, "repeats": repeats,
        "rope_parameters": dict(getattr(model.config, "rope_parameters", None) or {}), "rows": [],
    }

    for ctx in ctxs:
        windows_per_run = max(1, tokens_per_run // ctx)
        documents = _documents(ctx, windows_per_run, model.config.vocab_size, seed + ctx)
        windows = plan_windows([len(d) for d in documents], ctx, ctx)
        bs = batch_size or auto_batch_size(ctx, device, windows)
        forward_tokens = sum(w.end - w.start for w in windows)
        for label, spec in specs.items():
            for backend in (["sdpa"] if spec.is_full else list(backends)):
                try:
                    _apply(model, spec, backend)
                except UserError as error:
                    say(f"  {label}: {error}")
                    continue
                attn = attention_flops(model, spec, ctx) * len(windows)
                paths = {"engine": lambda: score_windows(model, documents, windows, batch_size=bs)}
                if plain:
                    paths["plain"] = lambda: _eager(lambda: _plain_loop(model, documents, windows, bs, device))
                kernel = auto_kernel(model.config, spec, backend, ctx, device, dtype, backward=False)
                rows = {path: ModelRow(ctx, label, backend, path, bs, len(windows), forward_tokens, 0, None,
                                       None, None, None, None, None, None, times_s=[], kernel=kernel)
                        for path in paths}
                outcomes = {}
                for path, run in paths.items():  # warm-up (compiles kernels, builds block masks)
                    outcomes[path] = _guarded(rows[path], run)
                if compile and rows["engine"].error is None:
                    # A compiled engine runs the first batch of its shape eagerly and compiles at
                    # the next: where a run is one batch, that is the second run, still a warm-up.
                    outcomes["engine"] = _guarded(rows["engine"], paths["engine"])
                for _ in range(repeats):
                    for path, run in paths.items():
                        row = rows[path]
                        if row.error is None:
                            _reset_peak(device)
                            seconds = _guarded(row, lambda: wall_s(run, device))
                            if row.error is None:
                                row.times_s.append(seconds)
                                row.peak_memory_gib = max(row.peak_memory_gib or 0.0, _peak_memory(device) or 0.0) \
                                    if device.type == "cuda" else None
                engine = rows["engine"]
                if profile_dir is not None and engine.error is None:
                    try:  # a profiler that fails costs the breakdown, not the timing
                        engine.profile = profile_step(paths["engine"], device,
                                                      profile_dir / f"{ctx}-{label}-{backend}.txt")
                    except Exception as error:
                        say(f"  ctx {ctx} {label}: not profiled ({type(error).__name__}: {error})")
                for path, row in rows.items():
                    row.attention_flops = attn
                    if row.error is None:
                        row.seconds = statistics.median(row.times_s)
                        if path == "engine":
                            outcome = outcomes[path]
                            nll, scored = float(outcome.nll_sum.sum()), int(outcome.tokens.sum())
                            flops = 2.0 * body_params * forward_tokens + 2.0 * head_params * scored + attn
                        else:
                            nll, scored = outcomes[path]
                            flops = 2.0 * (body_params + head_params) * forward_tokens + attn
                        row.scored_tokens = scored
                        row.mean_nll = nll / scored
                        row.forward_tokens_per_s = forward_tokens / row.seconds
                        row.scored_tokens_per_s = scored / row.seconds
                        row.tflops = flops / row.seconds / 1e12
                        row.peak_share = row.tflops / peak
                    result["rows"].append(asdict(row))
                    say(_row_line(row))
                _reset_peak(device)
    _apply(model, pattern_from_label("full"), "sdpa")
    del model
    _reset_peak(device)
    return result


def _guarded(row: ModelRow, run: Callable[[], object]):
    """``run()``; an error goes into ``row.error`` (reported in the table) instead of
    stopping the other rows."""
    try:
        return run()
    except Exception as error:
        row.error = ("out of memory" if is_out_of_memory(error) else
                     f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}")
    return None


def _eager(run: Callable[[], object]):
    """``run()`` with every compiled module run eagerly: the plain loop stays the
    loop a user would write, also when the engine is compiled."""
    from ..evaluation.engine import run_eagerly

    with run_eagerly():
        return run()


def _num(value: float) -> str:
    """Three significant digits without scientific notation (TFLOP/s on CPU are small)."""
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def _apply(model, spec, backend: str) -> None:
    """Put ``model`` under ``spec`` with ``backend`` (full: transformers' own SDPA)."""
    from ..attention.register import apply_pattern

    apply_pattern(model, spec, backend="auto" if spec.is_full else backend)


def auto_kernel(config, spec, backend: str, ctx: int, device: torch.device, dtype: torch.dtype, *,
                backward: bool) -> str:
    """The kernel a layer's attention runs on ``backend`` at ``ctx`` tokens: for auto, its
    choice for this head shape, forward alone or with a backward to come. Asked with stand-ins
    of the right shape that hold one element each."""
    from ..attention import resolve_backend

    if spec.is_full:
        return "sdpa"
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads

    def stand_in(num_heads: int) -> torch.Tensor:
        one = torch.empty((), device=device, dtype=dtype, requires_grad=backward)
        return one.expand(1, num_heads, ctx, head_dim)

    q, k = stand_in(heads), stand_in(kv_heads)
    with torch.set_grad_enabled(backward):
        return resolve_backend(spec, device, backend, (q, k, k))


def backend_label(backend: str, kernel: str | None) -> str:
    """``auto (flex)``: the backend asked for and, where that was auto, what ran."""
    return f"{backend} ({kernel})" if backend == "auto" and kernel and kernel != "sdpa" else backend


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _row_line(row: ModelRow) -> str:
    head = f"  ctx {row.ctx:>6} {row.pattern:<11} {backend_label(row.backend, row.kernel):<8} {row.path:<6}"
    if row.error:
        return f"{head} {row.error}"
    memory = f", peak {row.peak_memory_gib:.1f} GiB" if row.peak_memory_gib is not None else ""
    return (f"{head} {row.seconds:.3f} s, {row.forward_tokens_per_s:,.0f} fwd tok/s, "
            f"{row.scored_tokens_per_s:,.0f} scored tok/s, {_num(row.tflops)} TFLOP/s "
            f"({100 * row.peak_share:.0f}% of peak){memory}, nll {row.mean_nll:.4f}")


def _rope_note(params: dict | None) -> str:
    if not params or params.get("rope_type", "default") == "default":
        return ""
    return f"; RoPE {params['rope_type']} x{params.get('factor')}"


def markdown_model(result: dict) -> str:
    """One table: rows = (ctx, pattern, backend, path); plus speedups over plain and over full."""
    sustained = result.get("matmul_sustained_tflops")
    lines = [f"Model {result['shape']} ({result['weights']} weights), {result['dtype']}, {result['device']}, "
             f"torch {result['torch']}, transformers {result['transformers']}; matrix-multiply peak "
             f"{_num(result['matmul_peak_tflops'])} TFLOP/s ({result['matmul_size']}^3 product, same run"
             + (f"; {_num(sustained)} TFLOP/s sustained over seconds, at the power limit" if sustained else "")
             + ")" + ("; engine compiled (`--compile`), plain loop eager" if result.get("compiled") else "")
             + _rope_note(result.get("rope_parameters"))
             + ". vs plain: ratio of the medians (range of the per-repeat ratios).", "",
             "| ctx | pattern | attention | path | batch | fwd tok/s | scored tok/s | TFLOP/s | % of peak "
             "| % of sustained | peak GiB | vs plain | vs full | goal vs full | mean NLL |",
             "| ---: | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    rows = result["rows"]
    index = {(r["ctx"], r["pattern"], r["backend"], r["path"]): r for r in rows}
    full_engine = {r["ctx"]: r for r in rows if r["pattern"] == "full" and r["path"] == "engine" and r["seconds"]}
    for r in rows:
        if r["error"]:
            lines.append(f"| {r['ctx']} | {r['pattern']} | {backend_label(r['backend'], r.get('kernel'))} | "
                         f"{r['path']} | {r['batch_size']} | {r['error']} | | | | | | | | | |")
            continue
        plain = index.get((r["ctx"], r["pattern"], r["backend"], "plain"))
        vs_plain = ""
        if r["path"] == "engine" and plain and plain["seconds"]:
            vs_plain = f"{r['scored_tokens_per_s'] / plain['scored_tokens_per_s']:.2f}x"
            pairs = list(zip(r.get("times_s") or [], plain.get("times_s") or []))
            if len(pairs) > 1:  # per repeat: plain's time over the engine's (same work)
                ratios = [p_s / e_s * r["scored_tokens"] / plain["scored_tokens"] for e_s, p_s in pairs]
                vs_plain += f" ({min(ratios):.2f}–{max(ratios):.2f})"
        full = full_engine.get(r["ctx"])
        vs_full = goal = ""
        if r["path"] == "engine" and full and r["pattern"] != "full":
            vs_full = f"{r['scored_tokens_per_s'] / full['scored_tokens_per_s']:.2f}x"
            # "at least half of what its attention-FLOP saving allows"
            allowed = (full["tflops"] * full["seconds"]) / (r["tflops"] * r["seconds"])
            goal = f"{1 + (allowed - 1) / 2:.2f}x"
        memory = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "–"
        of_sustained = f"{100 * r['tflops'] / sustained:.0f}%" if sustained else "–"
        lines.append(f"| {r['ctx']} | {r['pattern']} | {backend_label(r['backend'], r.get('kernel'))} | "
                     f"{r['path']} | {r['batch_size']} | {r['forward_tokens_per_s']:,.0f} | "
                     f"{r['scored_tokens_per_s']:,.0f} | {_num(r['tflops'])} | "
                     f"{100 * r['peak_share']:.0f}% | {of_sustained} | {memory} | {vs_plain} | {vs_full} | {goal} | "
                     f"{r['mean_nll']:.4f} |")
    cells = []
    for r in rows:
        profiled = r.get("profile") or {}
        if r["error"] or r["path"] != "engine" or profiled.get("busy_ms") is None:
            continue
        cell = dict(r, step_ms=1000 * r["seconds"])
        full = full_engine.get(r["ctx"])
        if r["pattern"] != "full" and full and (full.get("profile") or {}).get("busy_ms") is not None:
            cell["bounds"] = speed_bounds(1000 * r["seconds"], profiled, 1000 * full["seconds"], full["profile"],
                                          r["attention_flops"] / full["attention_flops"])
        cells.append(cell)
    if cells:
        lines += ["", markdown_breakdown(cells, "engine run").rstrip("\n")]
    return "\n".join(lines) + "\n"
