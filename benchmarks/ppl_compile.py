"""`ppl --compile` against `ppl` on real documents: the command a user types.

Builds (once) a model folder of the LLaMA-2-7B shape with random bf16 weights (see
data_parallel.py), then runs on one GPU

    scca-eval ppl --model FOLDER --task TASK --ctx CTX -q --out WORK/eager
    scca-eval ppl --model FOLDER --task TASK --ctx CTX -q --out WORK/compiled --compile

Documents end in shorter windows, which the compiled engine runs eagerly (one
compiled shape per pattern and ctx); the records' scoring times therefore include the
compilation and those windows. Reports scored tokens/s of both, the wall time with
loading, and how far the perplexities and per-document sums differ (bf16 noise).

    python benchmarks/ppl_compile.py --json benchmarks/results/h200_ppl_compile.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from data_parallel import build_model_folder, run_ppl  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama2-7b")
    parser.add_argument("--ctx", type=int, default=8192)
    parser.add_argument("--task", default="pg19_sample")
    parser.add_argument("--pattern", default="full")
    parser.add_argument("--workdir", type=Path, default=None, help="Where the model folder and records go.")
    parser.add_argument("--json", type=Path, default=None, help="Also write the summary to this file.")
    args = parser.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="scca-eval-ppl-compile-"))
    model = work / f"{args.shape}-random"
    build_model_folder(model, args.shape, args.ctx)
    pattern = ["--pattern", args.pattern]
    runs = work / f"runs-{time.strftime('%Y%m%d-%H%M%S')}-{args.task}-{args.pattern}"
    eager, wall_eager = run_ppl(model, runs / "eager", args.task, args.ctx, pattern)
    compiled, wall_compiled = run_ppl(model, runs / "compiled", args.task, args.ctx, [*pattern, "--compile"])

    pairs = list(zip(eager["documents"], compiled["documents"]))
    worst = max(abs(b["nll_sum"] - a["nll_sum"]) / abs(a["nll_sum"]) for a, b in pairs)
    tps = {"eager": eager["runtime"]["tokens_per_second"], "compiled": compiled["runtime"]["tokens_per_second"]}
    ppl = {"eager": eager["metrics"]["perplexity"], "compiled": compiled["metrics"]["perplexity"]}
    summary = {
        "shape": args.shape, "ctx": args.ctx, "task": args.task, "pattern": args.pattern,
        "scored_tokens": eager["metrics"]["tokens"], "documents": len(pairs),
        "tokens_per_second": tps, "speedup": tps["compiled"] / tps["eager"],
        "scoring_seconds": {"eager": eager["runtime"]["seconds"], "compiled": compiled["runtime"]["seconds"]},
        "wall_seconds_with_loading": {"eager": round(wall_eager, 1), "compiled": round(wall_compiled, 1)},
        "perplexity": ppl, "perplexity_relative_difference": abs(ppl["compiled"] - ppl["eager"]) / ppl["eager"],
        "max_document_relative_difference": worst, "device": eager["runtime"]["device"],
    }
    print(json.dumps(summary, indent=2))
    print(f"\n| run | scored tokens/s | scoring s | wall s | perplexity |\n| --- | ---: | ---: | ---: | ---: |\n"
          f"| ppl | {tps['eager']:,.0f} | {summary['scoring_seconds']['eager']:.1f} | {wall_eager:.0f} | {ppl['eager']:.4f} |\n"
          f"| ppl --compile | {tps['compiled']:,.0f} | {summary['scoring_seconds']['compiled']:.1f} | "
          f"{wall_compiled:.0f} | {ppl['compiled']:.4f} |\n\nspeed-up {summary['speedup']:.2f}x; "
          f"largest per-document relative difference {worst:.2e}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
