#!/usr/bin/env bash
# CPU measurements of benchmarks/README.md: the README's main command with a cold and a
# warm cache, and the engine against a plain transformers loop on the default model.
# Usage: benchmarks/cpu_readme.sh OUTPUT_FOLDER   (run from an installed checkout)
set -euo pipefail
out=${1:?give an output folder}
mkdir -p "$out"
export SCCA_EVAL_CACHE="$out/cache"   # a fresh cache: the first run is cold
main=(scca-eval ppl --ctx 512,1024 --max-tokens 2048 --out "$out/runs")
{
  echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
  for run in cold warm; do
    start=$(date +%s.%N)
    "${main[@]}" -q > "$out/$run.txt" 2> "$out/$run.err"
    end=$(date +%s.%N)
    echo "$run: $(echo "$end - $start" | bc) s"
  done
  echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
} | tee "$out/readme_command.txt"
scca-eval bench model --shape default --device cpu --ctx 1024,2048 --pattern full,longmixed \
    --tokens-per-run 4096 --repeats 2 --json "$out/cpu_model.json" --markdown "$out/cpu_model.md" | tee "$out/cpu_model.log"
