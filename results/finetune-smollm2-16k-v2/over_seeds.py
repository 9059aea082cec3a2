"""The paired tests against s2 over seeds: per pattern, task and ctx, the mean change and how
many seeds' tests found the pattern worse, better or not different.

    python results/finetune-smollm2-16k-v2/over_seeds.py results/finetune-smollm2-16k-v2/compare \
        --out results/finetune-smollm2-16k-v2/compare-over-seeds

FOLDER holds `scca-eval compare --json` files named PATTERN-vs-REFERENCE-seedS.json (as
reproduce.sh names them). Writes OUT.md: per task, rows = pattern, columns = ctx, cells =
the change in perplexity against the reference checkpoint of the same seed (mean ± sd over
seeds, in percent) and the seeds' verdicts, e.g. "+6.8 ± 0.2% · worse 3/3". A pattern is
consistently worse (or better) where every seed's test says so. Where a seed's cell has too
little data for its test, the cell also says in how many of those seeds the point estimate
was higher (or lower): agreement in direction, not a test.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from seed_table import ORDER  # the row order of the seed tables beside this script
FILE_NAME = re.compile(r"^(?P<pattern>.+)-vs-(?P<reference>.+)-seed(?P<seed>\d+)\.json$")
VERDICTS = ("worse", "better", "no significant change", "not testable")
SHORT = {"no significant change": "equal"}


def read_cells(folder: Path) -> tuple[str | None, list[dict]]:
    """The reference pattern and one row per compared cell: pattern, seed, task, ctx, change, verdict."""
    rows, references = [], set()
    for path in sorted(folder.glob("*.json")):
        match = FILE_NAME.match(path.name)
        if match is None:
            continue
        references.add(match["reference"])
        for cell in json.loads(path.read_text(encoding="utf-8"))["cells"]:
            significant, change = cell["significant"], cell["relative_change"]
            verdict = ("not testable" if significant is None else "no significant change" if not significant
                       else "worse" if change > 0 else "better")
            rows.append({"pattern": match["pattern"], "seed": int(match["seed"]), "task": cell["task"],
                         "ctx": int(cell["ctx"]), "change": 100 * cell["relative_change"], "verdict": verdict})
    if len(references) > 1:
        raise ValueError(f"the files compare against more than one reference: {', '.join(sorted(references))}")
    return (references.pop() if references else None), rows


def _cell(rows: list[dict]) -> str:
    if not rows:
        return ""
    changes = [r["change"] for r in rows]
    spread = f" ± {statistics.stdev(changes):.1f}" if len(changes) > 1 else ""
    counts = defaultdict(int)
    for row in rows:
        counts[row["verdict"]] += 1
    verdicts = ", ".join(f"{SHORT.get(v, v)} {counts[v]}/{len(rows)}" for v in VERDICTS if counts[v])
    untested = [r["change"] for r in rows if r["verdict"] == "not testable"]
    if untested:  # no test, but whether the seeds' point estimates at least agree in direction
        higher = sum(change > 0 for change in untested)
        verdicts += (f" (higher in {higher}/{len(untested)})" if higher * 2 >= len(untested)
                     else f" (lower in {len(untested) - higher}/{len(untested)})")
    return f"{statistics.fmean(changes):+.1f}{spread}% · {verdicts}"


def markdown(reference: str, rows: list[dict]) -> str:
    patterns = sorted({r["pattern"] for r in rows}, key=lambda p: (ORDER.index(p) if p in ORDER else len(ORDER), p))
    parts = []
    for task in sorted({r["task"] for r in rows}):
        ctxs = sorted({r["ctx"] for r in rows if r["task"] == task})
        lines = [f"**{task}** — change in perplexity against the {reference} checkpoint of the same seed, mean ± sd "
                 f"over seeds; the paired tests' verdicts (worse, better, equal: no significant change)", "",
                 "| trained with | " + " | ".join(str(c) for c in ctxs) + " |",
                 "| --- | " + " | ".join("---:" for _ in ctxs) + " |"]
        for pattern in patterns:
            cells = [_cell([r for r in rows if (r["pattern"], r["task"], r["ctx"]) == (pattern, task, ctx)])
                     for ctx in ctxs]
            lines.append(f"| {pattern} | " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    seeds = sorted({r["seed"] for r in rows})
    parts.append(f"Seeds: {', '.join(str(s) for s in seeds)}. Each seed's test: `scca-eval compare` (paired "
                 "bootstrap, significant when p < 0.05), in `compare/PATTERN-vs-" + reference + "-seedS.md`. "
                 "Where a test could not run, \"higher in k/n\" counts the seeds whose perplexity was higher "
                 "than the reference's: a direction, not a test.")
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="folder of PATTERN-vs-REFERENCE-seedS.json files from scca-eval compare --json")
    parser.add_argument("--out", required=True, help="file name prefix for .md")
    args = parser.parse_args(argv)
    try:
        reference, rows = read_cells(Path(args.folder))
    except ValueError as error:
        print(f"over_seeds.py: {error}", file=sys.stderr)
        return 2
    if not rows:
        print(f"over_seeds.py: no PATTERN-vs-REFERENCE-seedS.json files under {args.folder}", file=sys.stderr)
        return 2
    Path(f"{args.out}.md").write_text(markdown(reference, rows), encoding="utf-8")
    print(f"wrote {args.out}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
