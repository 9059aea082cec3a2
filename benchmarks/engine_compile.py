"""Does compiling the decoder layers (fused RMSNorm / RoPE / SiLU·mul kernels) speed up
the evaluation engine? Times, in one process, on a random-weight model of a named shape:
the plain transformers loop, the engine, and the engine with `compile_decoder_layers`.

    python benchmarks/engine_compile.py --shape llama2-7b --ctx 8192 --json out.json
"""

from __future__ import annotations

import argparse
import json

import torch

from scca_eval.bench.model import _documents, _plain_loop, bench_model
from scca_eval.bench.timing import time_wall_s
from scca_eval.engine import compile_decoder_layers, score_windows
from scca_eval.windows import plan_windows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama2-7b")
    parser.add_argument("--ctx", default="8192")
    parser.add_argument("--tokens-per-run", type=int, default=32768)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    ctxs = [int(c) for c in args.ctx.split(",")]
    model, _ = bench_model(args.shape, device=device, dtype=dtype, max_ctx=max(ctxs))
    rows = []
    for compiled in (False, True):
        if compiled:
            compile_decoder_layers(model)
        for ctx in ctxs:
            docs = _documents(ctx, max(1, args.tokens_per_run // ctx), model.config.vocab_size, ctx)
            windows = plan_windows([len(d) for d in docs], ctx, ctx)
            tokens = sum(w.end - w.score_from for w in windows)
            paths = {"engine+compile" if compiled else "engine": lambda: score_windows(model, docs, windows, batch_size=1)}
            if not compiled:
                paths["plain"] = lambda: _plain_loop(model, docs, windows, 1, device)
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
    base = {r["ctx"]: r["scored_tokens_per_s"] for r in rows if r["path"] == "plain"}
    for r in rows:
        r["vs_plain"] = r["scored_tokens_per_s"] / base[r["ctx"]]
        print(f"ctx {r['ctx']:>6} {r['path']:<15} {r['scored_tokens_per_s']:>10,.0f} scored tok/s  "
              f"{r['vs_plain']:.2f}x plain  peak {r['peak_gib'] or 0:.1f} GiB")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"shape": args.shape, "dtype": str(dtype), "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
