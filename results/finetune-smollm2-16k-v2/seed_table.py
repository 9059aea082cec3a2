"""Perplexity over seeds: mean ± sd per training pattern, task and ctx, from `scca-eval sweep` records.

    python results/finetune-smollm2-16k-v2/seed_table.py results/finetune-smollm2-16k-v2/full-attention/main \
        --out results/finetune-smollm2-16k-v2/main-full-attention

Each sub-folder of FOLDER is one fine-tuned checkpoint, named PATTERN-seedS (as
reproduce.sh names them). Writes OUT.md (per task: rows = training pattern, columns =
ctx, cells = mean ± sample sd of the perplexity over the seeds, with the number of seeds;
then the change against s2 of the same seed, mean ± sd over seeds) and OUT.csv (every
seed's value, full precision).
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import statistics
import sys
from pathlib import Path

ORDER = ("full", "s2", "scca_fixed", "scca_flow", "sda", "longmixed")
RUN_NAME = re.compile(r"^(?P<pattern>.+)-seed(?P<seed>\d+)$")


def read_cells(folder: Path) -> list[dict]:
    """One row per record: pattern, seed, task, ctx, perplexity."""
    rows = []
    for run in sorted(p for p in folder.iterdir() if p.is_dir()):
        match = RUN_NAME.match(run.name)
        if match is None:
            continue
        for path in sorted(run.glob("*.json")):
            record = json.loads(path.read_text(encoding="utf-8"))
            if "metrics" not in record or "perplexity" not in record["metrics"]:
                continue
            rows.append({"pattern": match["pattern"], "seed": int(match["seed"]), "task": record["task"],
                         "ctx": int(record["ctx"]), "perplexity": float(record["metrics"]["perplexity"])})
    return rows


def _mean_sd(values: list[float], digits: int) -> str:
    if not values:
        return ""
    sd = statistics.stdev(values) if len(values) > 1 else float("nan")
    spread = f" ± {sd:.{digits}f}" if len(values) > 1 else ""
    return f"{statistics.fmean(values):.{digits}f}{spread} ({len(values)})"


def markdown(rows: list[dict], reference: str = "s2") -> str:
    patterns = sorted({r["pattern"] for r in rows}, key=lambda p: (ORDER.index(p) if p in ORDER else len(ORDER), p))
    value = {(r["pattern"], r["seed"], r["task"], r["ctx"]): r["perplexity"] for r in rows}
    parts = []
    for task in sorted({r["task"] for r in rows}):
        ctxs = sorted({r["ctx"] for r in rows if r["task"] == task})
        header = "| trained with | " + " | ".join(str(c) for c in ctxs) + " |"
        rule = "| --- | " + " | ".join("---:" for _ in ctxs) + " |"
        lines = [f"**{task}** — token perplexity, mean ± sd over seeds (number of seeds)", "", header, rule]
        changes = [f"**{task}** — change against the {reference} checkpoint of the same seed, in percent, "
                   "mean ± sd over seeds (number of seeds)", "", header, rule]
        for pattern in patterns:
            cells, change_cells = [], []
            for ctx in ctxs:
                seeds = sorted(s for (p, s, t, c) in value if (p, t, c) == (pattern, task, ctx))
                cells.append(_mean_sd([value[pattern, s, task, ctx] for s in seeds], 2))
                paired = [100 * (value[pattern, s, task, ctx] / value[reference, s, task, ctx] - 1)
                          for s in seeds if (reference, s, task, ctx) in value]
                change_cells.append(_mean_sd(paired, 1) if pattern != reference else "")
            lines.append(f"| {pattern} | " + " | ".join(cells) + " |")
            if pattern != reference:
                changes.append(f"| {pattern} | " + " | ".join(change_cells) + " |")
        parts += ["\n".join(lines), "\n".join(changes)]
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="folder of PATTERN-seedS sub-folders of sweep records")
    parser.add_argument("--out", required=True, help="file name prefix for .md and .csv")
    parser.add_argument("--reference", default="s2", help="the pattern the changes are taken against")
    args = parser.parse_args(argv)
    rows = read_cells(Path(args.folder))
    if not rows:
        print(f"seed_table.py: no PATTERN-seedS records under {args.folder}", file=sys.stderr)
        return 2
    Path(f"{args.out}.md").write_text(markdown(rows, args.reference), encoding="utf-8")
    with open(f"{args.out}.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["pattern", "seed", "task", "ctx", "perplexity"])
        writer.writeheader()
        writer.writerows(sorted(rows, key=lambda r: (r["task"], r["pattern"], r["seed"], r["ctx"])))
    print(f"wrote {args.out}.md and .csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
