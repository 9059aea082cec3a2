"""Loss curves of the fine-tunes: one line per training pattern, from their training.json files.

    python results/finetune-smollm2-16k/loss_curves.py results/finetune-smollm2-16k/training --out results/finetune-smollm2-16k/loss

Writes OUT.png, OUT.svg and OUT.md: per run the mean training loss over the first 20 steps,
the 20 before the last 20 and the last 20, the change between the last two means with twice
its standard error (a change well outside that band means the curve is still moving), and
the run's speed and memory as its training.json recorded them.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

ORDER = ("full", "s2", "scca_fixed", "scca_flow", "sda", "longmixed")
WINDOW = 20


def _mean_se(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return mean, se


def summarize(run: dict) -> dict:
    loss = run["loss_curve"]
    last_mean, last_se = _mean_se(loss[-WINDOW:])
    before_mean, before_se = _mean_se(loss[-2 * WINDOW:-WINDOW])
    noise = 2 * math.sqrt(last_se ** 2 + before_se ** 2)
    runtime = run["runtime"]
    return {
        "pattern": run["pattern_name"], "steps": run["steps"], "tokens": run["tokens_seen"],
        "first": statistics.fmean(loss[:WINDOW]), "before": before_mean, "last": last_mean,
        "change": last_mean - before_mean, "noise": noise,
        "seconds": runtime["seconds"], "tokens_per_second": runtime["tokens_per_second"],
        "peak_gib": runtime["peak_memory"]["bytes"] / 2 ** 30,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="folder of <pattern>.json training records")
    parser.add_argument("--out", required=True, help="file name prefix for .png, .svg and .md")
    args = parser.parse_args(argv)
    runs = [json.loads(path.read_text(encoding="utf-8")) for path in sorted(Path(args.folder).glob("*.json"))]
    if not runs:
        print(f"loss_curves.py: no training records in {args.folder}", file=sys.stderr)
        return 2
    runs.sort(key=lambda run: ORDER.index(run["pattern_name"]) if run["pattern_name"] in ORDER else len(ORDER))

    rows = [summarize(run) for run in runs]
    lines = [f"Training loss (mean over {WINDOW} steps; one {runs[0]['ctx']:,}-token window per step); "
             "change: last 20 minus the 20 before, ± twice its standard error. "
             "Speed and memory as each run recorded them.", "",
             "| trained with | steps | tokens | loss, first 20 | loss, 20 before the last | loss, last 20 | change | "
             "run time | tokens/s | peak GiB |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        lines.append(f"| {row['pattern']} | {row['steps']} | {row['tokens']:,} | {row['first']:.4f} | "
                     f"{row['before']:.4f} | {row['last']:.4f} | {row['change']:+.3f} ± {row['noise']:.3f} | "
                     f"{row['seconds']:.0f} s | {row['tokens_per_second']:,.0f} | {row['peak_gib']:.1f} |")
    Path(f"{args.out}.md").write_text("\n".join(lines) + "\n", encoding="utf-8")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 4.5))
    for run in runs:
        loss = run["loss_curve"]
        smooth = [statistics.fmean(loss[max(0, i - 9):i + 1]) for i in range(len(loss))]
        axis.plot(range(1, len(loss) + 1), smooth, label=f"trained with {run['pattern_name']}")
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("training loss (running mean of 10 steps)")
    axis.set_title(f"LoRA fine-tuning at ctx {runs[0]['ctx']:,}, SmolLM2-135M, 2x linear interpolation")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    for suffix in ("png", "svg"):
        figure.savefig(f"{args.out}.{suffix}", dpi=120)
    print(f"wrote {args.out}.png, .svg and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
