#!/usr/bin/env bash
# The GPU measurements of benchmarks/README.md, in one go (one H200, about 10 minutes).
# Usage: benchmarks/run_h200.sh OUTPUT_FOLDER
set -uo pipefail
out=${1:?give an output folder}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
log="$out/run.log"
step() { echo "== $*" | tee -a "$log"; }

step "environment"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
} 2>&1 | tee -a "$log"

step "GPU tests: bf16 against a float64 reference"
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/attention/test_flex.py tests/attention/test_strided.py -k gpu > "$out/pytest_gpu.log" 2>&1
tail -3 "$out/pytest_gpu.log" | tee -a "$log"

step "attention alone, N = 8192 and 32768"
timeout 170 python3 benchmarks/attention.py --n 8192,32768 --backends flex,chunked,strided,strided-serial \
    --variants flex-unsafe,flex-tma,flex-split,flex-contig --json "$out/attention.json" 2>&1 | tee -a "$log" | grep -v "^  "

step "LLaMA-2-7B shape, engine and plain loop, strided layout for the sparse patterns"
timeout 170 python3 benchmarks/model.py --shape llama2-7b --ctx 8192,32768 --backends strided \
    --json "$out/model_strided.json" 2>&1 | tee -a "$log" | tail -28

step "LLaMA-2-7B shape, FlexAttention for the sparse patterns (engine only)"
timeout 100 python3 benchmarks/model.py --shape llama2-7b --ctx 8192,32768 --patterns s2,scca_fixed,scca_flow,sda,longmixed \
    --backends flex --no-plain --json "$out/model_flex.json" 2>&1 | tee -a "$log" | tail -14

step "LLaMA-2-7B shape, full attention at 65536 (memory)"
timeout 60 python3 benchmarks/model.py --shape llama2-7b --ctx 65536 --patterns full --tokens-per-run 65536 \
    --repeats 1 --json "$out/model_64k.json" 2>&1 | tee -a "$log" | tail -6

step "LLaMA-2-7B shape, compiled engine against the eager plain loop (engine default batch, then batch 1)"
timeout 150 python3 -m scca_eval bench model --shape llama2-7b --ctx 8192,32768 --pattern full --compile \
    --repeats 5 --json "$out/model_compile.json" 2>&1 | tee -a "$log" | tail -8
timeout 120 python3 -m scca_eval bench model --shape llama2-7b --ctx 8192 --pattern full --compile \
    --batch-size 1 --repeats 5 --json "$out/model_compile_b1.json" 2>&1 | tee -a "$log" | tail -6
