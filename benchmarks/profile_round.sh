#!/usr/bin/env bash
# The ninth round (benchmarks/README.md): where the speed issue's measures spend their GPU
# time, kernel class by kernel class, on one GPU, in stages (STAGES picks some, default all):
#   tests    GPU tests of FlexAttention at the SmolLM2-135M head shape (and of compiled
#            layers on it tracing whole), of every backend running without host syncs,
#            and of the kernel classification,
#   profile  the default fine-tuning step and evaluation (bench model), SmolLM2-135M
#            shape at 16k, each cell profiled,
#   tiles    FlexAttention's forward and backward tiles at that head shape and 16k,
#   table    attention alone for every backend at that head shape and 16k, merged into
#            auto's backend table.
# and, asked for by name (the tenth round):
#   compiled evaluation compiled (bench model --compile) and the compiled step without
#            checkpointing, at that shape and 16k, profiled,
#   attn32k  attention alone at that head shape and 32k, every backend, merged into auto's table,
#   train7b  the default fine-tuning step of the LLaMA-2-7B shape at 8k, every preset,
# and (the twelfth round):
#   gputests every GPU test of the suite (tests -m gpu, the files that hold them),
#   ctx7b    evaluation of the LLaMA-2-7B shape at 8k-128k, every preset (ctx_scaling.py),
# and (the thirteenth round):
#   casts    the step with each activation cast once against autocast's cast per reader
#            (cast_once.py), SmolLM2-135M shape at 16k, and the default step's full attention
#            against the plain peft loop,
#   repeatkv FlexAttention with key/value heads repeated per query head against its grouped-query
#            call, attention alone at 16k on the SmolLM2 head shape, forward and backward
#            (full too: FlexAttention's own causal kernel against SDPA's, the part of each miss that
#            is the kernel's and not the pattern's), and the 64x64 backward tile with and without
#            the Hopper forward tile,
#   repeatkvtrain  the compiled step (no checkpointing, as the v2 runs train) of full, s2, sda and
#            longmixed on flex, with FlexAttention's default and with DEFAULT_REPEAT_KV on.
# and (the fourteenth round):
#   bwdtile  FlexAttention's Hopper tiles for small heads with the 64x64 backward tile (the default
#            now) against the forward tile alone (the default before): attention alone at 16k on
#            the SmolLM2 head shape, then the default step and the step replayed as CUDA graphs,
#            each run with the forward tile alone first and both tiles second,
#   issue    every row of the speed issue's table in one go (the default step, auto's, and LongLoRA's
#            checkpointed step, each with the plain peft loop beside full attention; evaluation,
#            attention alone at 16k on the SmolLM2 shape; the default step of the LLaMA-2-7B shape at 8k),
#   table7b  attention alone at the LLaMA-2-7B head shape at 32k and 64k, every backend, forward
#            alone, merged into auto's table (which holds that head shape at 8k only).
# and (the fifteenth round):
#   stepplan the GPU tests of the step auto takes (its prediction against the memory a whole
#            window holds), then the default step of the LLaMA-2-7B shape at 8k (its peaks).
# Everything lands in OUT/profile_round.tar.gz (rewritten after every step, so a run cut
# short keeps what it finished), with OUT/backend_table.json beside it (to commit as
# scca_eval/attention/backend_table.json). Every step runs under a timeout.
# Usage: [STAGES="tests profile"] benchmarks/profile_round.sh [OUT]    (default: $OUT)
set -uo pipefail
. "$(dirname "$0")/round_lib.sh"
round_setup profile_round "tests profile tiles table" "${1:-}"
smollm=(--heads 9 --kv-heads 3 --head-dim 64)
# scca-eval under a timeout, with one statement run first on scca_eval.attention.flex (imported as
# flex), to time a setting that is not the default: with_flex SECONDS 'STATEMENT' ARGS...
with_flex() {
  timeout "$1" python3 -c "import sys; import scca_eval.attention.flex as flex; $2
from scca_eval.cli import main; sys.argv[0] = 'scca-eval'; main()" "${@:3}"
}
shape=(--shape smollm2-135m --ctx 16384)
step "environment"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee -a "$log"

if want tests; then
step "(a) GPU tests: flex at the SmolLM2 head shape, no host syncs, kernel classes"
timeout 300 python3 -m pytest -q -p no:cacheprovider -m gpu -k "small_heads or fp32 or never_wait or splits_attention or no_graph_break" \
    tests/attention/test_flex.py tests/attention/test_training_attention.py tests/bench/test_profiling.py \
    > "$work/pytest_gpu.log" 2>&1
tail -5 "$work/pytest_gpu.log" | tee -a "$log"
fi

if want profile; then
step "(b) the default fine-tuning step, profiled"
timeout 200 python3 -m scca_eval bench train "${shape[@]}" --gradient-checkpointing --warmup 1 --steps 3 --profile "$work/profile_train" \
    --json "$work/train.json" --markdown "$work/train.md" >> "$log" 2>&1
step "(c) evaluation, profiled"
timeout 120 python3 -m scca_eval bench model "${shape[@]}" --profile "$work/profile_model" \
    --json "$work/model.json" --markdown "$work/model.md" >> "$log" 2>&1
fi

if want tiles; then
step "(e) FlexAttention tiles"
timeout 300 python3 benchmarks/attention.py --n 16384 "${smollm[@]}" --patterns s2,scca_fixed,sda,longmixed \
    --backends flex --variants flex-fwd-128x64,flex-fwd-128x128w8,flex-fwd-64x128,flex-bwd-64x64,flex-bwd-32x128,flex-bwd-64x128w4 \
    --modes fwd,fwd+bwd --repeats 10 --json "$work/tiles.json" --markdown "$work/tiles.md" >> "$log" 2>&1
fi

if want table; then
step "(f) attention alone, every backend, into auto's table"
timeout 150 python3 -m scca_eval bench attention "${smollm[@]}" --n 16384 --mode fwd,fwd+bwd --repeats 10 --no-check \
    --write-table "$table" --json "$work/attention.json" --markdown "$work/attention.md" >> "$log" 2>&1
fi
if want compiled; then
step "(g) evaluation compiled, profiled"
timeout 360 python3 -m scca_eval bench model "${shape[@]}" --compile --no-plain \
    --profile "$work/profile_model_compiled" --json "$work/model_compiled.json" \
    --markdown "$work/model_compiled.md" >> "$log" 2>&1
step "(j) the compiled step without checkpointing, profiled"
timeout 200 python3 -m scca_eval bench train "${shape[@]}" --compile --no-gradient-checkpointing --no-cuda-graphs \
    --offload-activations off --no-baseline --warmup 2 --steps 5 --profile "$work/profile_train_compiled" \
    --json "$work/train_compiled.json" --markdown "$work/train_compiled.md" >> "$log" 2>&1
fi

if want attn32k; then
step "(h) attention alone at 32k, every backend, into auto's table"
timeout 200 python3 -m scca_eval bench attention "${smollm[@]}" --n 32768 --mode fwd,fwd+bwd --repeats 10 --no-check \
    --write-table "$table" \
    --json "$work/attention_32k.json" --markdown "$work/attention_32k.md" >> "$log" 2>&1
fi

if want train7b; then
step "(i) the default fine-tuning step, LLaMA-2-7B shape at 8k"
timeout 540 python3 -m scca_eval bench train --shape llama2-7b --ctx 8192 --gradient-checkpointing --warmup 1 --steps 3 \
    --json "$work/train7b.json" --markdown "$work/train7b.md" >> "$log" 2>&1
fi
if want gputests; then
step "(k) every GPU test"
# the files that mark GPU tests (collecting the whole suite would need its CPU-only extras)
gpu_files=$(grep -rlE 'mark\.gpu\b' tests --include='test_*.py' | sort)
timeout 480 python3 -m pytest -q -p no:cacheprovider -m gpu $gpu_files > "$work/pytest_gpu_all.log" 2>&1
tail -3 "$work/pytest_gpu_all.log" | tee -a "$log"
fi

if want ctx7b; then
step "(l) evaluation of the LLaMA-2-7B shape at 8k-128k"
timeout 300 python3 benchmarks/ctx_scaling.py "$work/ctx7b" --ctx 8192,32768,65536,131072 --essential-ctx 32768 \
    --compiled-ctx 0 --budget-s 200 >> "$log" 2>&1
fi
if want casts; then
step "(m) activations cast once, and the default step against the plain loop"
timeout 150 python3 benchmarks/cast_once.py --shape smollm2-135m --ctx 16384 --steps 12 \
    --json "$work/cast_once.json" >> "$log" 2>&1
timeout 120 python3 -m scca_eval bench train "${shape[@]}" --pattern full --gradient-checkpointing --warmup 2 --steps 10 \
    --json "$work/train_full_baseline.json" --markdown "$work/train_full_baseline.md" >> "$log" 2>&1
fi
if want repeatkv; then
step "(n) FlexAttention with key/value heads repeated per query head"
timeout 240 python3 benchmarks/attention.py --n 16384 "${smollm[@]}" --patterns full,s2,scca_fixed,scca_flow,sda,longmixed \
    --backends flex --variants flex-repeat-kv,flex-repeat-kv-bwd-64x64,flex-bwd-64x64,flex-fwd-64x128-bwd-64x64 --modes fwd,fwd+bwd --repeats 10 \
    --json "$work/repeat_kv.json" --markdown "$work/repeat_kv.md" >> "$log" 2>&1
fi
if want repeatkvtrain; then
step "(o) the compiled step with key/value heads repeated for FlexAttention, and without"
train_args=(bench train "${shape[@]}" --pattern full,s2,sda,longmixed --backend flex --compile
            --no-gradient-checkpointing --no-cuda-graphs --offload-activations off --no-baseline --warmup 2 --steps 5)
timeout 270 python3 -m scca_eval "${train_args[@]}" --json "$work/train_flex_gqa.json" >> "$log" 2>&1
with_flex 270 'flex.DEFAULT_REPEAT_KV = True' "${train_args[@]}" \
    --json "$work/train_flex_repeat_kv.json" >> "$log" 2>&1
fi
if want bwdtile; then
step "(p) the backward tile: attention alone, then the step, forward tile alone and both tiles"
timeout 200 python3 benchmarks/attention.py --n 16384 "${smollm[@]}" --patterns full,s2,scca_fixed,scca_flow,sda,longmixed \
    --backends flex --variants flex-fwd-64x128,flex-fwd-64x128-bwd-64x64 --modes fwd,fwd+bwd --repeats 20 \
    --json "$work/tiles_16k.json" --markdown "$work/tiles_16k.md" >> "$log" 2>&1
forward_tile_only='flex.HOPPER_SMALL_HEAD_TILES = dict(flex.HOPPER_SMALL_HEAD_FORWARD_TILE)'
for steps in default cuda_graphs; do
  train_args=(bench train "${shape[@]}" --gradient-checkpointing --no-baseline --warmup 2 --steps 10)
  [ $steps = cuda_graphs ] && train_args=(bench train "${shape[@]}" --no-baseline --warmup 2 --steps 8 --cuda-graphs)
  with_flex 180 "$forward_tile_only" "${train_args[@]}" --json "$work/train_${steps}_forward_tile.json" >> "$log" 2>&1
  timeout 180 python3 -m scca_eval "${train_args[@]}" --json "$work/train_${steps}_tiles.json" >> "$log" 2>&1
done
fi
if want issue; then
step "(q) the speed issue's table: SmolLM2-135M shape at 16k, LLaMA-2-7B shape at 8k"
# the default step (auto: CUDA graphs where every activation fits), then LongLoRA's checkpointed step
for steps in auto checkpointed; do
  option=(); [ $steps = checkpointed ] && option=(--gradient-checkpointing)
  timeout 150 python3 -m scca_eval bench train "${shape[@]}" "${option[@]}" --warmup 2 --steps 10 \
      --json "$work/issue_train_16k_$steps.json" --markdown "$work/issue_train_16k_$steps.md" >> "$log" 2>&1
done
timeout 120 python3 -m scca_eval bench model "${shape[@]}" \
    --json "$work/issue_model_16k.json" --markdown "$work/issue_model_16k.md" >> "$log" 2>&1
timeout 120 python3 -m scca_eval bench attention "${smollm[@]}" --n 16384 --mode fwd,fwd+bwd --repeats 10 --no-check \
    --json "$work/issue_attention_16k.json" --markdown "$work/issue_attention_16k.md" >> "$log" 2>&1
timeout 200 python3 -m scca_eval bench train --shape llama2-7b --ctx 8192 --warmup 1 --steps 3 \
    --json "$work/issue_train_llama2-7b_8k.json" --markdown "$work/issue_train_llama2-7b_8k.md" >> "$log" 2>&1
fi
if want table7b; then
step "(r) attention alone at the LLaMA-2-7B head shape, 32k and 64k, into auto's table"
timeout 300 python3 -m scca_eval bench attention --heads 32 --kv-heads 32 --head-dim 128 --n 32768,65536 \
    --mode fwd --repeats 5 --no-check --write-table "$table" \
    --json "$work/attention_7b_32k_64k.json" --markdown "$work/attention_7b_32k_64k.md" >> "$log" 2>&1
fi
if want stepplan; then
step "(s) the step auto takes: its GPU tests, the LLaMA-2-7B default step at 8k"
timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu tests/training/test_step_plan.py \
    > "$work/pytest_step_plan.log" 2>&1
tail -3 "$work/pytest_step_plan.log" | tee -a "$log"
timeout 240 python3 -m scca_eval bench train --shape llama2-7b --ctx 8192 --pattern full,s2,sda,longmixed \
    --warmup 1 --steps 3 --json "$work/train_llama2-7b_8k_auto.json" --markdown "$work/train_llama2-7b_8k_auto.md" \
    >> "$log" 2>&1
fi
step "done"
