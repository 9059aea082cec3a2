"""Where does the compiled engine's time go, and which change to it pays?

In one process, on a random-weight model of a named shape: the plain transformers
loop, the engine, the engine with compiled layers, a kernel profile of the latter,
then variants of the compiled engine, each timed against the plain loop of the same run.

    python benchmarks/engine_variants.py --shape llama2-7b --ctx 8192 --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import defaultdict

import torch

import scca_eval.evaluation.engine as engine
from scca_eval.bench.model import _documents, _plain_loop, bench_model
from scca_eval.bench.timing import time_wall_s
from scca_eval.evaluation.windows import plan_windows


def kernel_category(name: str) -> str:
    low = name.lower()
    if "triton" in low:  # inductor names its fused kernels after the ops they absorb
        return "fused (triton)"
    if any(k in low for k in ("cudnn", "flash", "fmha", "attention", "sdpa")):
        return "attention"
    if any(k in low for k in ("gemm", "nvjet", "xmma", "cutlass", "cublas", "matmul", "_mm_")):
        return "matmul"
    if "copy" in low or "memcpy" in low or "memset" in low:
        return "copy"
    return "other"


def profile_once(run, device, out_dir: str, label: str) -> dict:
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        begin = time.perf_counter()
        run()
        torch.cuda.synchronize(device)
        wall = time.perf_counter() - begin
    by_category, by_name = defaultdict(float), defaultdict(lambda: [0.0, 0])
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = event.device_time_total if hasattr(event, "device_time_total") else event.cuda_time_total
        by_category[kernel_category(event.name)] += us
        by_name[event.name][0] += us
        by_name[event.name][1] += 1
    top = sorted(by_name.items(), key=lambda item: -item[1][0])[:40]
    summary = {"label": label, "wall_ms": wall * 1e3,
               "kernel_ms": {k: v / 1e3 for k, v in sorted(by_category.items(), key=lambda kv: -kv[1])},
               "kernel_total_ms": sum(by_category.values()) / 1e3,
               "top": [{"name": n[:160], "ms": t / 1e3, "calls": c} for n, (t, c) in top]}
    with open(os.path.join(out_dir, f"profile_{label}.json"), "w") as handle:
        json.dump(summary, handle, indent=1)
    print(f"profile {label}: wall {summary['wall_ms']:.1f} ms, kernels {summary['kernel_total_ms']:.1f} ms: "
          + ", ".join(f"{k} {v:.1f}" for k, v in summary["kernel_ms"].items()), flush=True)
    for row in summary["top"][:25]:
        print(f"   {row['ms']:8.2f} ms {row['calls']:5d}x  {row['name'][:110]}", flush=True)
    return summary


class FusedGateUpMLP(torch.nn.Module):
    """LLaMA MLP with gate and up projections in one matrix product."""

    def __init__(self, mlp):
        super().__init__()
        gate, up = mlp.gate_proj, mlp.up_proj
        self.gate_up = torch.nn.Linear(gate.in_features, 2 * gate.out_features, bias=False,
                                       device=gate.weight.device, dtype=gate.weight.dtype)
        with torch.no_grad():
            self.gate_up.weight.copy_(torch.cat([gate.weight, up.weight]))
        self.down_proj, self.act_fn = mlp.down_proj, mlp.act_fn

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down_proj(self.act_fn(gate) * up)


def fuse_mlps(model) -> None:
    for layer in model.get_decoder().layers:
        layer.mlp = FusedGateUpMLP(layer.mlp)


def recompile(model, mode=None, options=None) -> None:
    """``engine.compile_for_evaluation`` again, with other compile settings for the layers."""
    torch._dynamo.reset()
    engine.compile_for_evaluation(model)
    if mode or options:
        kwargs = {"dynamic": False, **({"options": options} if options else {"mode": mode})}
        for layer in model.get_decoder().layers:
            layer.compile(**kwargs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama2-7b")
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--ctx", type=int, default=8192)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", default="coord,fused,autotune")
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, _ = bench_model(args.shape, device=device, dtype=dtype, max_ctx=args.ctx, layers=args.layers)
    docs = _documents(args.ctx, args.windows, model.config.vocab_size, 1)
    windows = plan_windows([len(d) for d in docs], args.ctx, args.ctx)
    tokens = sum(w.scored for w in windows)
    rows, results_path = [], os.path.join(args.out, "variants.json")

    def plain():
        return _plain_loop(model, docs, windows, 1, device)

    def run_engine():
        return engine.score_windows(model, docs, windows, batch_size=1)

    def measure(label, fn, profile=False):
        begin = time.perf_counter()
        out = fn()  # warm-up, compilation
        warm_s = time.perf_counter() - begin
        nll = float(out.nll_sum.sum()) / tokens if hasattr(out, "nll_sum") else out[0] / out[1]
        seconds = time_wall_s(fn, device, warmup=0, repeats=args.repeats)
        row = {"variant": label, "seconds": seconds, "scored_tokens_per_s": tokens / seconds,
               "warmup_s": warm_s, "mean_nll": nll,
               "graph_breaks": sum(torch._dynamo.utils.counters["graph_break"].values())}
        rows.append(row)
        plain_rows = [r for r in rows if r["variant"] == "plain"]
        if plain_rows:
            row["vs_plain"] = row["scored_tokens_per_s"] / plain_rows[-1]["scored_tokens_per_s"]
        print(json.dumps(row), flush=True)
        with open(results_path, "w") as handle:
            json.dump({"shape": args.shape, "ctx": args.ctx, "tokens": tokens, "rows": rows}, handle, indent=1)
        if profile and device.type == "cuda":
            profile_once(fn, device, args.out, label)

    measure("plain", plain)
    measure("engine", run_engine, profile=True)
    engine.compile_for_evaluation(model)
    measure("compile", run_engine, profile=True)
    for variant in args.variants.split(","):
        try:
            if "fused" in variant and not isinstance(model.get_decoder().layers[0].mlp, FusedGateUpMLP):
                fuse_mlps(model)
            if variant == "autotune":
                recompile(model, mode="max-autotune-no-cudagraphs")
            elif variant == "coord":
                recompile(model, options={"coordinate_descent_tuning": True})
            else:
                recompile(model)
            measure(variant, run_engine)
        except Exception as error:  # a variant that fails is reported, the others still run
            print(f"variant {variant} failed: {type(error).__name__}: {str(error)[:300]}", flush=True)
    measure("plain+compiled-layers", plain)  # the plain loop through the same compiled layers
    print()
    for r in rows:
        print(f"{r['variant']:<14} {r['scored_tokens_per_s']:>10,.0f} tok/s  {r.get('vs_plain', 1):.3f}x plain  "
              f"nll {r['mean_nll']:.5f}  warm {r['warmup_s']:.0f}s  breaks {r['graph_breaks']}")


if __name__ == "__main__":
    main()
