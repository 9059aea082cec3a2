"""Does compiling the decoder layers (fused RMSNorm / RoPE / SiLU·mul kernels) speed up
the evaluation engine? Times, in one process, on a random-weight model of a named shape:
the plain transformers loop, the engine, and the engine with `compile_for_evaluation`.

    python benchmarks/engine_compile.py --shape llama2-7b --ctx 8192 --json out.json
"""

from __future__ import annotations

import argparse
import json

import torch

from scca_eval.bench.model import _documents, _plain_loop, bench_model
from scca_eval.bench.timing import time_wall_s
from scca_eval.evaluation.engine import compile_for_evaluation, score_windows
from scca_eval.evaluation.windows import plan_windows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama2-7b")
    parser.add_argument("--ctx", default="8192")
    parser.add_argument("--tokens-per-run", type=int, default=32768)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--data-wait-tokens", type=int, default=0,
                        help="Also measure how long the GPU waits on the host over a run of about this many "
                             "scored tokens (compiled engine, first ctx): 1 - (windows x one window's GPU time) / wall.")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    ctxs = [int(c) for c in args.ctx.split(",")]
    model, _ = bench_model(args.shape, device=device, dtype=dtype, max_ctx=max(ctxs))
    rows = []
    for compiled in (False, True):
        if compiled:
            compile_for_evaluation(model)
        for ctx in ctxs:
            docs = _documents(ctx, max(1, args.tokens_per_run // ctx), model.config.vocab_size, ctx)
            windows = plan_windows([len(d) for d in docs], ctx, ctx)
            tokens = sum(w.end - w.score_from for w in windows)
            paths = {"engine+compile" if compiled else "engine": lambda: score_windows(model, docs, windows, batch_size=args.batch_size)}
            if not compiled:
                paths["plain"] = lambda: _plain_loop(model, docs, windows, args.batch_size, device)
            for name, run in paths.items():
                run()  # warm-up (and compilation)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                seconds = time_wall_s(run, device, warmup=0, repeats=args.repeats)
                peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
                row = {"ctx": ctx, "path": name, "seconds": seconds, "scored_tokens_per_s": tokens / seconds,
                       "peak_gib": peak}
                rows.append(row)
                print(json.dumps(row), flush=True)
    measure_wait = args.data_wait_tokens and device.type == "cuda"  # CUDA events time the GPU
    wait = data_wait(model, ctxs[0], args.data_wait_tokens, args.batch_size, device) if measure_wait else None
    if wait is not None:
        print(json.dumps(wait), flush=True)
    base = {r["ctx"]: r["scored_tokens_per_s"] for r in rows if r["path"] == "plain"}
    for r in rows:
        r["vs_plain"] = r["scored_tokens_per_s"] / base[r["ctx"]]
        print(f"ctx {r['ctx']:>6} {r['path']:<15} {r['scored_tokens_per_s']:>10,.0f} scored tok/s  "
              f"{r['vs_plain']:.2f}x plain  peak {r['peak_gib'] or 0:.1f} GiB")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"shape": args.shape, "dtype": str(dtype), "batch_size": args.batch_size, "rows": rows,
                       "data_wait": wait}, handle, indent=2)


def data_wait(model, ctx: int, tokens: int, batch_size: int, device) -> dict:
    """Share of a long run's wall time in which the GPU has no work from the engine:
    1 - (number of batches x the GPU time of one batch) / wall time of the whole run."""
    windows_count = max(1, tokens // (ctx - 1))
    docs = _documents(ctx, windows_count, model.config.vocab_size, 7)
    windows = plan_windows([len(d) for d in docs], ctx, ctx)
    one = windows[:batch_size]
    score_windows(model, docs, one, batch_size=batch_size)  # warm
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        torch.cuda.synchronize(device)
        start.record()
        score_windows(model, docs, one, batch_size=batch_size)
        end.record()
        torch.cuda.synchronize(device)
        times.append(start.elapsed_time(end) / 1000)
    per_batch = sorted(times)[len(times) // 2]
    wall = time_wall_s(lambda: score_windows(model, docs, windows, batch_size=batch_size), device,
                       warmup=0, repeats=1)
    batches = -(-len(windows) // batch_size)
    return {"ctx": ctx, "windows": len(windows), "scored_tokens": sum(w.scored for w in windows),
            "wall_seconds": wall, "gpu_seconds_per_batch": per_batch,
            "wait_share": max(0.0, 1 - batches * per_batch / wall)}


if __name__ == "__main__":
    main()
