#!/usr/bin/env bash
# Re-makes the committed results of the embedded default model (see results/README.md):
# the records in results/smollm2-135m/, the tables results/smollm2-135m.{md,csv}, the plot
# results/smollm2-135m.{png,svg}, and the results section of results/README.md.
#
#   results/reproduce.sh                 # on the default device (a GPU when there is one)
#   results/reproduce.sh --device cpu    # extra arguments go to `scca-eval sweep`
#
# The sweep skips cells whose record already exists with the same configuration, so an
# interrupted run continues where it stopped when started again.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
NAME=results/smollm2-135m

"$PYTHON" -m scca_eval sweep "$NAME.yaml" "$@"
"$PYTHON" -m scca_eval table "$NAME" --ci --reference scca_paper_pg19 --output "$NAME.md"
"$PYTHON" -m scca_eval table "$NAME" --ci --format csv --output "$NAME.csv"
"$PYTHON" -m scca_eval plot "$NAME" --out "$NAME" --title "SmolLM2-135M, 147,456 scored tokens per cell"

# Put the table and the plot between the markers of results/README.md.
"$PYTHON" - "$NAME.md" <<'PY'
import sys
from pathlib import Path

readme = Path("results/README.md")
begin, end = "<!-- results:begin -->", "<!-- results:end -->"
text = readme.read_text(encoding="utf-8")
head, rest = text.split(begin, 1)
_, tail = rest.split(end, 1)
table = Path(sys.argv[1]).read_text(encoding="utf-8").strip()
body = f"{table}\n\n![Perplexity against ctx](smollm2-135m.png)\n"
readme.write_text(f"{head}{begin}\n{body}{end}{tail}", encoding="utf-8")
print(f"updated {readme}")
PY
