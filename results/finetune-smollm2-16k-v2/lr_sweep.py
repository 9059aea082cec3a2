"""The learning-rate sweep: the final validation loss of each (pattern, lr) run, and the lr chosen.

    python results/finetune-smollm2-16k-v2/lr_sweep.py results/finetune-smollm2-16k-v2/training/sweep \
        --out results/finetune-smollm2-16k-v2/lr-sweep

Reads the sweep's training.json copies (one per run, any names) and writes:

- OUT.json: per pattern the final validation loss at each lr, the chosen lr (lowest final
  validation loss) and whether it lies at the edge of the grid (then the grid should be
  widened); the `finetune` and `matched` stages read the chosen lr from here.
- OUT.md: the same as a table, the chosen lr in bold, with the convergence verdict of
  each run (training.json's rule).
- OUT.png / OUT.svg: final validation loss against lr, one line per pattern.

Only the validation loss decides; no evaluation sample is looked at.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ORDER = ("full", "s2", "scca_fixed", "scca_flow", "sda", "longmixed")


def _order(pattern: str) -> int:
    return ORDER.index(pattern) if pattern in ORDER else len(ORDER)


def read_runs(folder: Path) -> dict[str, dict[float, dict]]:
    """{pattern: {lr: training record}}; refuses a run without a validation curve."""
    runs: dict[str, dict[float, dict]] = {}
    for path in sorted(folder.glob("*.json")):
        record = json.loads(path.read_text(encoding="utf-8"))
        curve = (record.get("validation") or {}).get("curve") or []
        if not curve:
            raise SystemExit(f"lr_sweep.py: {path} has no validation curve; the sweep runs need --eval-task")
        runs.setdefault(record["pattern_name"], {})[float(record["recipe"]["lr"])] = record
    return runs


def choose(runs: dict[str, dict[float, dict]]) -> dict:
    """Per pattern: the final validation loss at each lr and the lr with the lowest one."""
    choice = {"rule": "the lr with the lowest final validation loss (full attention), per pattern",
              "best": {}, "at_grid_edge": [], "final_validation_loss": {}, "steps": {}}
    for pattern in sorted(runs, key=_order):
        by_lr = runs[pattern]
        final = {lr: record["validation"]["curve"][-1]["loss"] for lr, record in sorted(by_lr.items())}
        finite = {lr: loss for lr, loss in final.items() if math.isfinite(loss)}
        if not finite:
            raise SystemExit(f"lr_sweep.py: every {pattern} run ended with a non-finite validation loss")
        best = min(finite, key=finite.get)
        choice["best"][pattern] = best
        choice["final_validation_loss"][pattern] = {repr(lr): loss for lr, loss in final.items()}
        choice["steps"][pattern] = sorted({record["steps"] for record in by_lr.values()})
        if len(final) > 1 and best in (min(final), max(final)):
            choice["at_grid_edge"].append(pattern)
    return choice


def markdown(runs: dict[str, dict[float, dict]], choice: dict) -> str:
    rates = sorted({lr for by_lr in runs.values() for lr in by_lr})
    lines = ["Final validation loss (full attention, the fixed validation windows) after the sweep's steps, per "
             "training pattern and peak learning rate; the lowest per pattern in bold (the rate chosen). "
             "Marks: ✓ flattened, ↓ still falling, ↑ rising, – not judged (training.json's convergence rule).", "",
             "| trained with | steps | " + " | ".join(f"lr {lr:g}" for lr in rates) + " | chosen |",
             "| --- | ---: | " + " | ".join("---:" for _ in rates) + " | ---: |"]
    marks = {"flat": "✓", "falling": "↓", "rising": "↑"}
    for pattern in sorted(runs, key=_order):
        cells = []
        for lr in rates:
            record = runs[pattern].get(lr)
            if record is None:
                cells.append("")
                continue
            loss = record["validation"]["curve"][-1]["loss"]
            rule = record.get("convergence") or {}
            text = f"{loss:.4f} {marks.get(rule.get('direction'), '–')}"
            cells.append(f"**{text}**" if lr == choice["best"][pattern] else text)
        steps = "/".join(str(s) for s in choice["steps"][pattern])
        lines.append(f"| {pattern} | {steps} | " + " | ".join(cells) + f" | {choice['best'][pattern]:g} |")
    if choice["at_grid_edge"]:
        lines += ["", f"At the edge of the grid (widen it before trusting the choice): "
                      f"{', '.join(choice['at_grid_edge'])}."]
    return "\n".join(lines) + "\n"


def plot(runs: dict[str, dict[float, dict]], prefix: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for pattern in sorted(runs, key=_order):
        rates = sorted(runs[pattern])
        axis.plot(rates, [runs[pattern][lr]["validation"]["curve"][-1]["loss"] for lr in rates], marker="o",
                  label=f"trained with {pattern}")
    axis.set_xscale("log")
    axis.set_xlabel("peak learning rate")
    axis.set_ylabel("final validation loss (full attention)")
    axis.set_title("Learning-rate sweep")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    for suffix in ("png", "svg"):
        figure.savefig(f"{prefix}.{suffix}", dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="folder of the sweep runs' training.json copies")
    parser.add_argument("--out", required=True, help="file name prefix for .json, .md, .png and .svg")
    args = parser.parse_args(argv)
    runs = read_runs(Path(args.folder))
    if not runs:
        print(f"lr_sweep.py: no training records in {args.folder}", file=sys.stderr)
        return 2
    choice = choose(runs)
    Path(f"{args.out}.json").write_text(json.dumps(choice, indent=2) + "\n", encoding="utf-8")
    Path(f"{args.out}.md").write_text(markdown(runs, choice), encoding="utf-8")
    plot(runs, args.out)
    chosen = ", ".join(f"{pattern} {lr:g}" for pattern, lr in choice["best"].items())
    print(f"wrote {args.out}.json, .md, .png and .svg; chosen lr: {chosen}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
