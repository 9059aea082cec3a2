"""Perplexity against ctx, one line per row (baselines and training patterns), from the records.

    python results/finetune-smollm2-16k/ppl_vs_ctx.py results/finetune-smollm2-16k/full-attention --out results/finetune-smollm2-16k/full-attention

Each sub-folder of the given folder is one row (base, base-pi2, full, s2, ...); writes
OUT.png and OUT.svg with one panel per task and the 95% bootstrap intervals as bands.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROWS = {"base": "base model, no interpolation", "base-pi2": "base model, 2x interpolation, not fine-tuned",
        "full": "trained with full", "s2": "trained with s2", "scca_fixed": "trained with scca_fixed",
        "scca_flow": "trained with scca_flow", "sda": "trained with sda", "longmixed": "trained with longmixed"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    cells: dict[str, dict[str, list]] = {}
    for row in ROWS:
        for path in sorted((Path(args.folder) / row).glob("*.json")):
            record = json.loads(path.read_text(encoding="utf-8"))
            metrics = record["metrics"]
            cells.setdefault(record["task"], {}).setdefault(row, []).append(
                (record["ctx"], metrics["perplexity"], metrics.get("ci95")))
    if not cells:
        print(f"ppl_vs_ctx.py: no records under {args.folder}", file=sys.stderr)
        return 2
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted(cells)
    figure, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.8), squeeze=False)
    for axis, task in zip(axes[0], tasks):
        for row, label in ROWS.items():
            points = sorted(cells[task].get(row, []))
            if not points:
                continue
            ctx = [p[0] for p in points]
            style = "--" if row.startswith("base") else "-"
            line, = axis.plot(ctx, [p[1] for p in points], style, marker="o", label=label)
            if all(p[2] for p in points):
                axis.fill_between(ctx, [p[2][0] for p in points], [p[2][1] for p in points],
                                  color=line.get_color(), alpha=0.08)
        axis.set_xscale("log", base=2)
        axis.set_xticks(ctx, [str(c) for c in ctx])
        axis.set_xlabel("ctx (tokens), evaluated with full attention")
        axis.set_ylabel("token perplexity")
        axis.set_title(task)
        axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    figure.suptitle("SmolLM2-135M, 2x linear interpolation, LoRA fine-tuned under each pattern")
    figure.tight_layout()
    for suffix in ("png", "svg"):
        figure.savefig(f"{args.out}.{suffix}", dpi=110)
    print(f"wrote {args.out}.png and .svg")
    return 0


if __name__ == "__main__":
    sys.exit(main())
