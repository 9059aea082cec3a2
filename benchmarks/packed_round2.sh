#!/usr/bin/env bash
# The packed attention backend, heads in the kernel's head axis (one varlen call per head
# group), on one GPU (H100 or H200), in under 8 minutes:
#   (a) its GPU tests (FlashAttention's varlen kernel in bf16 against float64/float32
#       references, forward and gradients),
#   (b) attention alone for packed, strided and chunked, forward and forward+backward: the
#       SmolLM2-135M head shape (9 query / 3 key-value heads, dim 64) at 16k and 32k and the
#       LLaMA-2-7B one (32/32, dim 128) at 8k, merged into a copy of auto's backend table,
#       which then replaces scca_eval/attention/backend_table.json for the steps below,
#   (c) the fine-tuning step: SmolLM2-135M shape at 16k on auto, packed and strided;
#       LLaMA-2-7B shape at 8k on auto and packed,
#   (d) whole-model evaluation throughput, SmolLM2-135M shape at 16k, auto and packed.
# Everything lands in OUT/packed_round2.tar.gz (rewritten after every step, so a run cut
# short keeps what it finished); OUT/run.log and OUT/backend_table.json (the table to
# commit as scca_eval/attention/backend_table.json) also lie beside it. The timeouts add
# up to 7 minutes 50 seconds.
# Usage: benchmarks/packed_round2.sh [OUT]    (default: $OUT)
set -uo pipefail
out=${1:-${OUT:?give an output folder or set OUT}}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
work=$(mktemp -d)
log="$work/run.log"
table="$work/backend_table.json"
pack() {  # what is finished so far, into OUT
  cp "$log" "$out/run.log"
  [ -f "$table" ] && cp "$table" "$out/backend_table.json"
  tar -czf "$out/packed_round2.tar.gz.tmp" -C "$work" . && mv "$out/packed_round2.tar.gz.tmp" "$out/packed_round2.tar.gz"
}
step() { [ -f "$log" ] && pack; echo "== $(date +%T) $*" | tee -a "$log"; }
trap pack EXIT
smollm=(--heads 9 --kv-heads 3 --head-dim 64)
llama=(--heads 32 --kv-heads 32 --head-dim 128)

step "environment"
{ timeout 10 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  timeout 10 python3 -c "import torch, transformers, inspect; from torch.nn.attention.varlen import varlen_attn; print('torch', torch.__version__, 'transformers', transformers.__version__); print('varlen_attn', inspect.signature(varlen_attn))"
  # whether this varlen_attn takes fewer key/value heads as they are (FlashAttention itself does);
  # the packed backend repeats them unless its signature has enable_gqa
  timeout 15 python3 - <<'PY'
import torch
from torch.nn.attention.varlen import varlen_attn
g = torch.Generator(device="cuda").manual_seed(0)
q = torch.randn(300, 9, 64, device="cuda", dtype=torch.bfloat16, generator=g)
k, v = (torch.randn(300, 3, 64, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
cu = torch.tensor([0, 100, 300], device="cuda", dtype=torch.int32)
full = varlen_attn(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), cu, cu, 200, 200)
try:
    got = varlen_attn(q, k, v, cu, cu, 200, 200)
    print("varlen_attn with 3 key/value heads for 9 query heads: accepted, largest difference to repeated heads",
          float((got.float() - full.float()).abs().max()))
except Exception as error:
    print("varlen_attn with 3 key/value heads for 9 query heads: refused:", str(error).splitlines()[0])
PY
} 2>&1 | tee -a "$log"

step "(a) GPU tests of the packed backend"
timeout 120 python3 -m pytest -q -p no:cacheprovider -m gpu -k packed \
    tests/test_packed.py tests/test_attention.py tests/test_training_attention.py > "$work/pytest_gpu.log" 2>&1
tail -15 "$work/pytest_gpu.log" | tee -a "$log"

step "(b) attention alone, SmolLM2-135M heads at 16k and 32k: packed, strided, chunked; fwd and fwd+bwd"
cp scca_eval/attention/backend_table.json "$table"
timeout 80 python3 -m scca_eval bench attention "${smollm[@]}" --n 16384,32768 --backend packed,strided,chunked \
    --mode fwd,fwd+bwd --repeats 10 --json "$work/attention_smollm2.json" --markdown "$work/attention_smollm2.md" \
    --write-table "$table" 2>&1 | tee -a "$log" | grep -v "^  "

step "(b) attention alone, LLaMA-2-7B heads at 8k: packed, strided, chunked; fwd and fwd+bwd"
timeout 40 python3 -m scca_eval bench attention "${llama[@]}" --n 8192 --backend packed,strided,chunked \
    --mode fwd,fwd+bwd --repeats 10 --json "$work/attention_llama2.json" --markdown "$work/attention_llama2.md" \
    --write-table "$table" 2>&1 | tee -a "$log" | grep -v "^  "
# the steps below run auto from the table just measured
cp "$table" scca_eval/attention/backend_table.json

step "(c) fine-tuning step, SmolLM2-135M shape at 16k: auto, packed, strided"
timeout 80 python3 -m scca_eval bench train --shape smollm2-135m --ctx 16384 --backend auto,packed,strided \
    --json "$work/train_smollm2_16k.json" --markdown "$work/train_smollm2_16k.md" 2>&1 | tee -a "$log"

step "(c) fine-tuning step, LLaMA-2-7B shape at 8k: auto, packed"
timeout 70 python3 -m scca_eval bench train --shape llama2-7b --ctx 8192 --backend auto,packed \
    --json "$work/train_llama2_8k.json" --markdown "$work/train_llama2_8k.md" 2>&1 | tee -a "$log"

step "(d) evaluation throughput, SmolLM2-135M shape at 16k: auto, packed"
timeout 45 python3 -m scca_eval bench model --shape smollm2-135m --ctx 16384 --backend auto,packed --repeats 2 \
    --json "$work/model_smollm2_16k.json" --markdown "$work/model_smollm2_16k.md" 2>&1 | tee -a "$log" | tail -20
step "done"
