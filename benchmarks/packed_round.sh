#!/usr/bin/env bash
# The packed attention backend on one GPU (H100 or H200), in stages (all of them take longer
# than one 10-minute slot; STAGES picks some, default all):
#   tests      its GPU tests (FlashAttention's varlen kernel in bf16 against float64 references,
#              forward and gradients; --offload-activations auto's measurement),
#   attention  attention alone for every backend, forward and forward+backward: the SmolLM2-135M
#              head shape (9 query / 3 key-value heads, dim 64) at 16k and 32k and the LLaMA-2-7B
#              one (32/32, dim 128) at 8k, merged into auto's backend table,
#   train      the fine-tuning step with the defaults (auto backend from that table, activations
#              offloaded only where needed), SmolLM2-135M shape at 16k: baseline, full attention
#              and every preset, 2 warm-up + 5 timed steps each,
#   compiled   the same with the decoder layers compiled (finetune --compile), no baseline,
#   train7b    the fine-tuning step, LLaMA-2-7B shape at 8k,
#   model      whole-model evaluation throughput, SmolLM2-135M shape at 16k,
#   flex       FlexAttention, SmolLM2-135M heads at 16k and LLaMA-2-7B heads at 8k (it compiles its
#              kernels; a timeout there costs nothing else), merged into the table too.
# Everything lands in OUT/packed_round.tar.gz (rewritten after every step, so a run cut short
# keeps what it finished); OUT/run.log and OUT/backend_table.json (the table to commit as
# scca_eval/attention/backend_table.json) also lie beside it. Every step runs under a timeout.
# Usage: [STAGES="tests attention train"] benchmarks/packed_round.sh [OUT]    (default: $OUT)
set -uo pipefail
. "$(dirname "$0")/round_lib.sh"
round_setup packed_round "tests attention train compiled train7b model flex" "${1:-}"
smollm=(--heads 9 --kv-heads 3 --head-dim 64)
llama=(--heads 32 --kv-heads 32 --head-dim 128)
step "environment"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, transformers, triton, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__, 'peft', peft.__version__)"
  python3 -c "import inspect; from torch.nn.attention.varlen import varlen_attn; print('varlen_attn', inspect.signature(varlen_attn))"
} 2>&1 | tee -a "$log"

if want tests; then
step "(a) GPU tests of the packed backend, auto, and --offload-activations auto"
timeout 120 python3 -m pytest -q -p no:cacheprovider -m gpu -k "packed or auto or varlen or offload" \
    tests/attention/test_packed.py tests/attention/test_attention.py tests/attention/test_training_attention.py \
    tests/training/test_offload.py tests/training/test_finetune.py > "$work/pytest_gpu.log" 2>&1
tail -15 "$work/pytest_gpu.log" | tee -a "$log"
fi

if want attention; then
step "(b) attention alone, SmolLM2-135M heads at 16k and 32k: packed, strided, chunked; fwd and fwd+bwd"
timeout 90 python3 -m scca_eval bench attention "${smollm[@]}" --n 16384,32768 --backend packed,strided,chunked \
    --mode fwd,fwd+bwd --repeats 10 --json "$work/attention_smollm2.json" --markdown "$work/attention_smollm2.md" \
    --write-table "$table" 2>&1 | tee -a "$log" | grep -v "^  "

step "(b) attention alone, LLaMA-2-7B heads at 8k: packed, strided, chunked; fwd and fwd+bwd"
timeout 50 python3 -m scca_eval bench attention "${llama[@]}" --n 8192 --backend packed,strided,chunked \
    --mode fwd,fwd+bwd --repeats 10 --json "$work/attention_llama2.json" --markdown "$work/attention_llama2.md" \
    --write-table "$table" 2>&1 | tee -a "$log" | grep -v "^  "
fi

# the steps below run auto from the table just measured
cp "$table" scca_eval/attention/backend_table.json

if want train; then
step "(c) fine-tuning step, SmolLM2-135M shape at 16k: baseline, full, every preset on auto"
timeout 100 python3 -m scca_eval bench train --shape smollm2-135m --ctx 16384 --backend auto --gradient-checkpointing \
    --warmup 2 --steps 5 --json "$work/train_smollm2_16k.json" --markdown "$work/train_smollm2_16k.md" 2>&1 | tee -a "$log"
fi

if want compiled; then
step "(c) fine-tuning step with compiled layers, SmolLM2-135M shape at 16k: full, every preset on auto"
timeout 240 python3 -m scca_eval bench train --shape smollm2-135m --ctx 16384 --backend auto --compile --gradient-checkpointing --no-baseline \
    --warmup 2 --steps 5 --json "$work/train_smollm2_16k_compiled.json" --markdown "$work/train_smollm2_16k_compiled.md" \
    2>&1 | tee -a "$log"
fi

if want train7b; then
step "(c) fine-tuning step, LLaMA-2-7B shape at 8k: baseline, full, every preset on auto"
timeout 90 python3 -m scca_eval bench train --shape llama2-7b --ctx 8192 --backend auto --gradient-checkpointing --steps 3 \
    --json "$work/train_llama2_8k.json" --markdown "$work/train_llama2_8k.md" 2>&1 | tee -a "$log"
fi

if want model; then
step "(d) evaluation throughput, SmolLM2-135M shape at 16k: engine and plain loop, auto and strided"
timeout 60 python3 -m scca_eval bench model --shape smollm2-135m --ctx 16384 --backend auto,strided --repeats 2 \
    --json "$work/model_smollm2_16k.json" --markdown "$work/model_smollm2_16k.md" 2>&1 | tee -a "$log" | tail -20
fi

if want flex; then
step "(e) attention alone, FlexAttention (compiled), SmolLM2-135M heads at 16k"
timeout 50 python3 -m scca_eval bench attention "${smollm[@]}" --n 16384 --backend flex --mode fwd,fwd+bwd \
    --repeats 10 --no-check --json "$work/attention_smollm2_flex.json" --write-table "$table" 2>&1 | tee -a "$log" \
    | grep -v "^  "
step "(e) attention alone, FlexAttention (compiled), LLaMA-2-7B heads at 8k"
timeout 50 python3 -m scca_eval bench attention "${llama[@]}" --n 8192 --backend flex --mode fwd,fwd+bwd \
    --repeats 10 --no-check --json "$work/attention_llama2_flex.json" --write-table "$table" 2>&1 | tee -a "$log" \
    | grep -v "^  "
fi

step "done"
