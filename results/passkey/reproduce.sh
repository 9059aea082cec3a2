#!/usr/bin/env bash
# Re-makes the committed passkey results of the embedded default model (see
# results/passkey/README.md): the records in results/passkey/smollm2-135m/, the tables
# results/passkey/smollm2-135m.{md,csv} and the heat maps results/passkey/smollm2-135m.{png,svg}.
#
#   results/passkey/reproduce.sh                     # every preset and local at 1k-8k (meant for a GPU)
#   results/passkey/reproduce.sh --device cpu --ctx 1024,2048 --trials 2
#
# Extra arguments go to `scca-eval passkey` and override the defaults below (a --pattern
# given there adds a pattern). A cell whose
# record already exists with the same settings is not run again, so an interrupted run
# continues where it stopped.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python}
NAME=results/passkey/smollm2-135m

"$PYTHON" -m scca_eval passkey --model default --pattern full,s2,scca_fixed,scca_flow,sda,longmixed,local \
    --ctx 1024,2048,4096,8192 --trials 10 --depths 5 --seed 0 --dtype float32 --out "$NAME" "$@"
"$PYTHON" -m scca_eval table "$NAME" --output "$NAME.md"
"$PYTHON" -m scca_eval table "$NAME" --format csv --output "$NAME.csv"
"$PYTHON" -m scca_eval plot "$NAME" --out "$NAME" --title "SmolLM2-135M: passkey retrieval accuracy"
