"""Context scaling: time per token, peak memory and each preset's speed-up over full attention
from 8k to 128k tokens (and 256k when the time budget allows), one window per run, on a model
of a named shape with random weights (LLaMA-2-7B, bf16 on a GPU); plus, in the same call, the
compiled engine against the plain transformers loop at 32k with full attention (what
`scca-eval bench model --shape llama2-7b --ctx 32768 --pattern full --compile --repeats 3` runs).

    python benchmarks/ctx_scaling.py OUT                          # one H200: under 4 minutes
    python benchmarks/ctx_scaling.py --render OUT/ctx_scaling.json  # the table and plot again

Writes OUT/ctx_scaling.json, OUT/ctx_scaling.md and OUT/ctx_scaling.png (the plot needs
matplotlib; without it, render the JSON later with --render). Every (ctx, pattern) cell runs
one window through the evaluation engine (`score_windows`, eager) after each pattern was run
once at the smallest ctx (kernels, cuDNN plans, the strided layout). Windows up to
--essential-ctx run first, then the compiled comparison, then the longer windows with the
time left: a cell whose predicted time does not fit the budget is recorded as skipped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from scca_eval.bench import markdown_model, model_bench, pattern_from_label, random_model  # noqa: E402
from scca_eval.bench.model import DEFAULT_PATTERNS, _apply, _documents, _peak_memory, _reset_peak  # noqa: E402
from scca_eval.bench.model import _linear_params, attention_flops, auto_kernel  # noqa: E402
from scca_eval.bench.timing import wall_s  # noqa: E402
from scca_eval.files import atomic_write_text  # noqa: E402

CTXS = "8192,16384,32768,65536,131072,262144"


def _one_window(model, ctx: int, seed: int):
    """One random document that makes exactly one ctx-long window, and that window."""
    from scca_eval.evaluation.windows import plan_windows

    documents = _documents(ctx, 1, model.config.vocab_size, seed + ctx)
    return documents, plan_windows([len(d) for d in documents], ctx, ctx)


def _run_cell(model, label: str, spec, ctx: int, device, seed: int) -> dict:
    from scca_eval.evaluation.engine import score_windows

    _apply(model, spec, "auto")
    documents, windows = _one_window(model, ctx, seed)
    body, head = _linear_params(model)
    row = {"ctx": ctx, "pattern": label, "seconds": None, "us_per_token": None, "peak_memory_gib": None,
           "flops": 2.0 * body * ctx + 2.0 * head * (ctx - 1) + attention_flops(model, spec, ctx),
           "mean_nll": None, "error": None,
           "kernel": auto_kernel(model.config, spec, "auto", ctx, device, model.dtype, backward=False)}
    _reset_peak(device)
    try:
        scores = []
        row["seconds"] = wall_s(lambda: scores.append(score_windows(model, documents, windows, batch_size=1)),
                                device)
    except torch.OutOfMemoryError:
        row["error"] = f"out of memory at ctx {ctx}, batch 1"
        _reset_peak(device)
        return row
    row["us_per_token"] = row["seconds"] / ctx * 1e6
    row["peak_memory_gib"] = _peak_memory(device)
    row["mean_nll"] = float(scores[0].nll_sum.sum() / scores[0].tokens.sum())
    return row


def _predicted_seconds(rows: list[dict], label: str, ctx: int) -> float | None:
    """The time of a pattern's next cell: its last time, grown per doubling of ctx as it grew
    over its last doubling (between 2x, the tokens alone, and 4x, attention alone; 4x when
    there is only one cell to go by)."""
    done = [r for r in rows if r["pattern"] == label and r.get("seconds")]
    if not done:
        return None
    last = done[-1]
    growth = 4.0
    if len(done) > 1:
        doublings = math.log2(last["ctx"] / done[-2]["ctx"])
        growth = min(4.0, max(2.0, (last["seconds"] / done[-2]["seconds"]) ** (1 / doublings)))
    return last["seconds"] * growth ** math.log2(ctx / last["ctx"])


def _scale(model, specs: dict, ctxs: list[int], rows: list[dict], device, deadline: float, seed: int,
           say) -> None:
    stopped: set[str] = set()  # patterns that ran out of memory: longer windows will too
    for ctx in ctxs:
        for label, spec in specs.items():
            if label in stopped:
                rows.append({"ctx": ctx, "pattern": label, "error": "skipped: out of memory at a shorter ctx"})
                continue
            predicted = _predicted_seconds(rows, label, ctx)
            left = deadline - time.perf_counter()
            if predicted is not None and predicted > left:
                rows.append({"ctx": ctx, "pattern": label,
                             "error": f"skipped: about {predicted:.0f} s predicted, {max(left, 0):.0f} s of the "
                                      "time budget left"})
                say(f"  ctx {ctx:>6} {label:<11} skipped (time budget)")
                continue
            row = _run_cell(model, label, spec, ctx, device, seed)
            rows.append(row)
            if row["error"]:
                stopped.add(label)
                say(f"  ctx {ctx:>6} {label:<11} {row['error']}")
            else:
                memory = f", peak {row['peak_memory_gib']:.1f} GiB" if row["peak_memory_gib"] is not None else ""
                say(f"  ctx {ctx:>6} {label:<11} {row['seconds']:.2f} s, {row['us_per_token']:.2f} us/token{memory}"
                    f" ({row['kernel']})")


def measure(args, say=print) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    began = time.perf_counter()
    deadline = began + args.budget_s
    ctxs = sorted(int(c) for c in args.ctx.split(","))
    specs = {label: pattern_from_label(label) for label in args.patterns.split(",")}
    model = random_model(args.shape, device=device, dtype=dtype, max_ctx=max(ctxs), layers=args.layers)
    result = {"shape": args.shape, "layers": model.config.num_hidden_layers, "dtype": str(dtype).replace("torch.", ""),
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "budget_s": args.budget_s,
              "compiled_reserve_s": args.compiled_reserve_s, "batch_size": 1, "repeats": 1,
              "patterns": list(specs), "ctxs": ctxs, "rows": [], "compiled": None}
    say(f"{args.shape}, {result['layers']} layers, {result['dtype']} on {result['device']}; "
        f"warming up each pattern at ctx {ctxs[0]}")
    for label, spec in specs.items():  # untimed
        _run_cell(model, label, spec, ctxs[0], device, args.seed)
    first = [c for c in ctxs if c <= args.essential_ctx]
    reserve = args.compiled_reserve_s if args.compiled_ctx else 0.0  # kept for the compiled comparison
    _scale(model, specs, first, result["rows"], device, deadline - reserve, args.seed, say)
    if args.compiled_ctx:
        say(f"compiled engine against the plain loop, ctx {args.compiled_ctx}, full attention")
        _apply(model, pattern_from_label("full"), "auto")
        result["compiled"] = model_bench(args.shape, [args.compiled_ctx], ["full"], device=device, dtype=dtype,
                                         tokens_per_run=args.compiled_ctx, repeats=args.compiled_repeats,
                                         compile=True, layers=args.layers, log=say)
    _scale(model, specs, [c for c in ctxs if c > args.essential_ctx], result["rows"], device, deadline,
           args.seed, say)
    result["seconds"] = time.perf_counter() - began
    return result


# ---- rendering: from the JSON alone ----------------------------------------------------

def _short_error(row: dict | None) -> str:
    if row is None:
        return "–"
    if row["error"].startswith("skipped: about"):
        return "skipped (time budget)"
    return row["error"].split(" at ctx")[0]


def markdown(result: dict) -> str:
    rows = {(r["ctx"], r["pattern"]): r for r in result["rows"]}
    patterns, ctxs = result["patterns"], result["ctxs"]
    lines = [f"Model {result['shape']} ({result['layers']} layers, random weights), {result['dtype']}, "
             f"{result['device']}, torch {result['torch']}; one window per run, batch 1, the engine eager. "
             "Cells: microseconds per token; in brackets the speed-up over full attention at the same ctx "
             "(and what the FLOPs alone would give).", "",
             "| ctx | " + " | ".join(patterns) + " |", "| ---: |" + " ---: |" * len(patterns)]
    for ctx in ctxs:
        full = rows.get((ctx, "full"))
        cells = []
        for label in patterns:
            r = rows.get((ctx, label))
            if r is None or r.get("error"):
                cells.append(_short_error(r))
                continue
            cell = f"{r['us_per_token']:.2f}"
            if label != "full" and full and not full.get("error"):
                cell += f" ({full['seconds'] / r['seconds']:.2f}x; {full['flops'] / r['flops']:.2f}x)"
            cells.append(cell)
        lines.append(f"| {ctx} | " + " | ".join(cells) + " |")
    if any(r.get("peak_memory_gib") is not None for r in result["rows"]):
        lines += ["", "Peak memory (GiB):", "", "| ctx | " + " | ".join(patterns) + " |",
                  "| ---: |" + " ---: |" * len(patterns)]
        for ctx in ctxs:
            cells = [f"{r['peak_memory_gib']:.1f}" if (r := rows.get((ctx, p))) and r.get("peak_memory_gib")
                     is not None else "–" for p in patterns]
            lines.append(f"| {ctx} | " + " | ".join(cells) + " |")
    sparse = [p for p in patterns if p != "full"]
    if sparse and any(r.get("kernel") for r in result["rows"]):
        lines += ["", "The kernel auto ran:", "", "| ctx | " + " | ".join(sparse) + " |",
                  "| ---: |" + " --- |" * len(sparse)]
        for ctx in ctxs:
            cells = [(r.get("kernel") or "–") if (r := rows.get((ctx, p))) else "–" for p in sparse]
            lines.append(f"| {ctx} | " + " | ".join(cells) + " |")
    if result.get("compiled"):
        lines += ["", markdown_model(result["compiled"]).rstrip()]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> bool:
    """Time per token, speed-up over full and peak memory against ctx; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    good = [r for r in result["rows"] if not r.get("error")]
    full = {r["ctx"]: r for r in good if r["pattern"] == "full"}
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for index, label in enumerate(result["patterns"]):
        style = {"marker": "o", "label": label, "color": f"C{index}"}  # one colour per pattern in every panel
        mine = [r for r in good if r["pattern"] == label]
        x = [r["ctx"] for r in mine]
        axes[0].plot(x, [r["us_per_token"] for r in mine], **style)
        versus = [(r["ctx"], full[r["ctx"]]["seconds"] / r["seconds"]) for r in mine if r["ctx"] in full]
        if label != "full" and versus:
            axes[1].plot(*zip(*versus), **style)
        if any(r.get("peak_memory_gib") is not None for r in mine):
            axes[2].plot(x, [r["peak_memory_gib"] for r in mine], **style)
    axes[1].axhline(1.0, color="grey", linestyle="--", linewidth=1)
    if not any(r.get("peak_memory_gib") is not None for r in good):
        axes[2].text(0.5, 0.5, "no device memory figures on CPU", ha="center", transform=axes[2].transAxes)
    titles = ("time per token (µs)", "speed-up over full attention", "peak memory (GiB)")
    for ax, title in zip(axes, titles):
        ax.set_xscale("log", base=2)
        ax.set_xticks(result["ctxs"], [f"{c // 1024}k" if c >= 1024 else str(c) for c in result["ctxs"]])
        ax.set_xlabel("ctx (tokens)")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.suptitle(f"{result['shape']}, {result['dtype']}, {result['device']}: one window per run")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp.png")
    figure.savefig(temporary, dpi=120)
    plt.close(figure)
    os.replace(temporary, path)
    return True


def render(result: dict, out: Path, say=print) -> None:
    table = markdown(result)
    atomic_write_text(out / "ctx_scaling.md", table)
    say(table)
    drawn = plot(result, out / "ctx_scaling.png")
    say(f"wrote {out / 'ctx_scaling.md'}" + (f" and {out / 'ctx_scaling.png'}" if drawn else
                                              " (no plot: matplotlib is not installed)"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?", help="Folder for ctx_scaling.json, .md and .png (default: $OUT).")
    parser.add_argument("--render", metavar="JSON", help="Only render the table and plot of an earlier run's JSON "
                                                         "(into OUT, default: the JSON's folder).")
    parser.add_argument("--shape", default="llama2-7b", help="Named shape or config .json (random weights).")
    parser.add_argument("--ctx", default=CTXS, help=f"Window lengths (default {CTXS}).")
    parser.add_argument("--patterns", default=",".join(DEFAULT_PATTERNS))
    parser.add_argument("--essential-ctx", type=int, default=131072,
                        help="Lengths up to this run before the compiled comparison (default 131072).")
    parser.add_argument("--compiled-ctx", type=int, default=32768, help="0: leave the compiled comparison out.")
    parser.add_argument("--compiled-repeats", type=int, default=3)
    parser.add_argument("--compiled-reserve-s", type=float, default=75.0,
                        help="Seconds of the budget the shorter windows leave for the compiled comparison.")
    parser.add_argument("--budget-s", type=float, default=200.0,
                        help="Seconds for the whole measurement; longer windows that would not fit are skipped.")
    parser.add_argument("--layers", type=int, default=None, help="Override the number of layers (quick checks).")
    parser.add_argument("--device", default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.render:
        source = Path(args.render)
        result = json.loads(source.read_text(encoding="utf-8"))
        render(result, Path(args.out) if args.out else source.parent)
        return
    out = args.out or os.environ.get("OUT")
    if not out:
        parser.error("give an output folder (or set $OUT)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result = measure(args)
    atomic_write_text(out / "ctx_scaling.json", json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {out / 'ctx_scaling.json'} ({result['seconds']:.0f} s of measuring)")
    render(result, out)


if __name__ == "__main__":
    main()
