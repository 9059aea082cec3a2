"""Training and validation curves of the fine-tunes, and each run's convergence verdict.

    python results/finetune-smollm2-16k-v2/curves.py results/finetune-smollm2-16k-v2/training/main \
        --out results/finetune-smollm2-16k-v2/curves-main

Reads the training.json copies in FOLDER (one per run; reproduce.sh names them PATTERN-seedS,
PATTERN or PATTERN-seedS under matched/) and writes:

- OUT.png / OUT.svg: left, the training loss (running mean of 10 steps), right, the
  validation loss (full attention, the same windows at every point), against the
  optimizer step; one line per training pattern, the mean over its seeds, with the
  seeds' range shaded where there are several.
- OUT.md: one row per run: lr, seed, steps, why it stopped, training time and tokens/s,
  the final validation loss and the convergence rule's verdict (training.json:
  last tenth minus the tenth before, ± 2 standard errors, paired by window).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ORDER = ("full", "s2", "scca_fixed", "scca_flow", "sda", "longmixed")
SMOOTH = 10


def _order(pattern: str) -> int:
    return ORDER.index(pattern) if pattern in ORDER else len(ORDER)


def read_runs(folder: Path) -> list[tuple[str, dict]]:
    runs = [(path.stem, json.loads(path.read_text(encoding="utf-8"))) for path in sorted(folder.glob("*.json"))]
    return sorted(runs, key=lambda run: (_order(run[1]["pattern_name"]), run[0]))


def convergence_table(runs: list[tuple[str, dict]]) -> str:
    lines = ["One row per run. Validation: full attention on the fixed validation windows. Verdict "
             "(training.json's rule): mean validation loss over the last tenth of the steps minus the tenth "
             "before, ± 2 standard errors paired by window; ✓ flattened (|change| < 2 SE), ↓ still falling, "
             "↑ rising, – not judged.", "",
             "| run | trained with | lr | seed | steps | stopped by | training s | tokens/s | final validation loss "
             "| change over the last tenth | verdict |",
             "| --- | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | :---: |"]
    marks = {"flat": "✓", "falling": "↓", "rising": "↑"}
    for name, record in runs:
        curve = (record.get("validation") or {}).get("curve") or []
        rule = record.get("convergence") or {}
        final = f"{curve[-1]['loss']:.4f}" if curve else ""
        if rule.get("converged") is None:
            change = rule.get("reason", "no validation") if rule else "no validation"
        else:
            change = f"{rule['change']:+.4f} ± {2 * rule['standard_error']:.4f}"
        runtime = record["runtime"]
        lines.append(f"| {name} | {record['pattern_name']} | {record['recipe']['lr']:g} | {record['recipe']['seed']} "
                     f"| {record['steps']} | {record.get('stopped_by', 'steps')} | {runtime['seconds']:.0f} "
                     f"| {runtime['tokens_per_second'] or 0:,.0f} | {final} | {change} "
                     f"| {marks.get(rule.get('direction'), '–')} |")
    return "\n".join(lines) + "\n"


def _band(series: list[list[float]]) -> tuple[list[float], list[float], list[float]]:
    """Mean, min and max over runs, step by step, as far as the shortest run goes."""
    length = min(len(s) for s in series)
    columns = [[s[i] for s in series] for i in range(length)]
    return ([statistics.fmean(c) for c in columns], [min(c) for c in columns], [max(c) for c in columns])


def plot(runs: list[tuple[str, dict]], prefix: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_pattern: dict[str, list[dict]] = {}
    for _, record in runs:
        by_pattern.setdefault(record["pattern_name"], []).append(record)
    figure, (train_axis, valid_axis) = plt.subplots(1, 2, figsize=(13, 4.8))
    for pattern, records in by_pattern.items():
        smoothed = [[statistics.fmean(r["loss_curve"][max(0, i - SMOOTH + 1):i + 1])
                     for i in range(len(r["loss_curve"]))] for r in records]
        mean, low, high = _band(smoothed)
        steps = range(1, len(mean) + 1)
        line, = train_axis.plot(steps, mean, label=f"trained with {pattern} ({len(records)} run(s))")
        if len(records) > 1:
            train_axis.fill_between(steps, low, high, color=line.get_color(), alpha=0.2)
        curves = [(r.get("validation") or {}).get("curve") or [] for r in records]
        if all(curves):
            # Points at the steps every run has (runs stopped by --max-time end at different steps).
            shared = sorted(set.intersection(*({p["step"] for p in c} for c in curves)))
            series = [[{p["step"]: p["loss"] for p in c}[s] for s in shared] for c in curves]
            mean, low, high = _band(series)
            valid_axis.plot(shared, mean, marker="o", markersize=3, color=line.get_color(),
                            label=f"trained with {pattern}")
            if len(records) > 1:
                valid_axis.fill_between(shared, low, high, color=line.get_color(), alpha=0.2)
    ctx = runs[0][1]["ctx"]
    train_axis.set_title(f"training loss (running mean of {SMOOTH} steps), ctx {ctx:,}")
    valid_axis.set_title("validation loss, full attention")
    for axis in (train_axis, valid_axis):
        axis.set_xlabel("optimizer step")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    for suffix in ("png", "svg"):
        figure.savefig(f"{prefix}.{suffix}", dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="folder of training.json copies")
    parser.add_argument("--out", required=True, help="file name prefix for .png, .svg and .md")
    args = parser.parse_args(argv)
    runs = read_runs(Path(args.folder))
    if not runs:
        print(f"curves.py: no training records in {args.folder}", file=sys.stderr)
        return 2
    Path(f"{args.out}.md").write_text(convergence_table(runs), encoding="utf-8")
    plot(runs, args.out)
    print(f"wrote {args.out}.png, .svg and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
