#!/usr/bin/env bash
# The paper's comparison at small scale (see README.md beside this file): SmolLM2-135M
# extended 2x with linear position interpolation (8k -> 16k) and LoRA fine-tuned once under
# each attention pattern with the same data, steps, tokens, learning rate and seed; then
# every checkpoint and the two baselines evaluated at 2k/4k/8k/16k on the held-out samples,
# with full attention and under the pattern each checkpoint was trained with.
#
#   results/finetune-smollm2-16k/reproduce.sh               # all stages, one GPU
#   results/finetune-smollm2-16k/reproduce.sh finetune      # or stages: finetune, evaluate, passkey, report
#   PARALLEL=6 results/finetune-smollm2-16k/reproduce.sh    # run that many fine-tunes/evaluations at once
#   COMPILE=1 ...                                           # finetune --compile (GPU): compiled decoder
#             layers, faster steps, the same results up to rounding
#   CHECKPOINTING=0 ...                                     # finetune --no-gradient-checkpointing
#             --offload-activations off --no-cuda-graphs (a GPU with room for every activation):
#             faster steps, the same results up to rounding
#   CUDA_GRAPHS=1 ...                                       # finetune --cuda-graphs (GPU; implies
#             COMPILE=1 CHECKPOINTING=0): each compiled layer replayed as a CUDA graph, so the
#             host's kernel launches no longer set the step's pace
#
# Every stage resumes: a fine-tune continues from its last checkpoint, a sweep skips the
# cells it already wrote. The adapters go to $CKPT (default: checkpoints/ here, not
# committed: trainable_params.bin holds the full embedding matrix); RESULTS=DIR writes the
# records, tables and plots there instead of here.
set -euo pipefail
cd "$(dirname "$0")/../.."
HERE=results/finetune-smollm2-16k
RESULTS=${RESULTS:-$HERE}         # where records, tables and plots go
CKPT=${CKPT:-$RESULTS/checkpoints}
PY=${PYTHON:-python}
PARALLEL=${PARALLEL:-1}
PATTERNS=(full s2 scca_fixed scca_flow sda longmixed)

# The recipe: LongLoRA's (rank 8, alpha 16, LoRA on q/k/v/o plus trainable embeddings and
# norms, AdamW, lr 2e-5, 20 warm-up steps then constant) with a smaller budget: one
# 16,384-token window per step, 200 steps (3.3M tokens per run).
CTX=${CTX:-16384}
STEPS=${STEPS:-200}
FINETUNE=(--model default --ctx "$CTX" --rope-scaling linear:2 --steps "$STEPS" --grad-accum 1
          --lr 2e-5 --warmup-steps 20 --seed 42 --save-every 50 --quiet)
case ${CUDA_GRAPHS:-0} in
    1) if [ "${CHECKPOINTING:-0}" != 0 ]; then
           echo "reproduce.sh: CUDA_GRAPHS=1 trains without gradient checkpointing: leave CHECKPOINTING unset or 0" >&2; exit 2
       fi
       COMPILE=1 CHECKPOINTING=0; FINETUNE+=(--cuda-graphs) ;;
    0) ;;
    *) echo "reproduce.sh: CUDA_GRAPHS must be 0 or 1 (got '$CUDA_GRAPHS')" >&2; exit 2 ;;
esac
[ "${COMPILE:-0}" = 1 ] && FINETUNE+=(--compile)
# The step is always named (by default --gradient-checkpointing, the committed runs' step):
# finetune's own default, auto, could choose differently for runs sharing a GPU (PARALLEL).
case ${CHECKPOINTING:-1} in
    0) FINETUNE+=(--no-gradient-checkpointing --offload-activations off)  # every activation kept on the GPU
       [ "${CUDA_GRAPHS:-0}" = 1 ] || FINETUNE+=(--no-cuda-graphs) ;;
    1) FINETUNE+=(--gradient-checkpointing) ;;
    *) echo "reproduce.sh: CHECKPOINTING must be 0 or 1 (got '$CHECKPOINTING')" >&2; exit 2 ;;
esac
# Evaluation: the paper's lengths scaled 2x, the first 24,577 tokens of each document.
EVAL_CTX=${EVAL_CTX:-2048,4096,8192,16384}
EVAL=(--ctx "$EVAL_CTX" --task pg19_sample --task proof_pile_sample --max-tokens "${MAX_TOKENS:-147456}")

# Passkey retrieval: 10 trials in each of 5 depth buckets, at the fine-tuned length and below.
PASSKEY=(--ctx "${PASSKEY_CTX:-4096,8192,16384}" --trials 10 --depths 5 --seed 0 --quiet)

run_parallel() {  # run the given commands (one per line on stdin), PARALLEL at a time
    local pids=() failed=0
    while IFS= read -r line; do
        bash -c "$line" & pids+=($!)
        if [ "${#pids[@]}" -ge "$PARALLEL" ]; then wait "${pids[0]}" || failed=1; pids=("${pids[@]:1}"); fi
    done
    for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
    return $failed
}

finetune() {
    mkdir -p "$RESULTS/training" "$CKPT"
    for p in "${PATTERNS[@]}"; do
        if [ -f "$CKPT/$p/training.json" ]; then  # finished (its checkpoint.pt is removed then)
            cp "$CKPT/$p/training.json" "$RESULTS/training/$p.json"; continue
        fi
        resume=""; [ -f "$CKPT/$p/checkpoint.pt" ] && resume="--resume"
        echo "$PY -m scca_eval finetune ${FINETUNE[*]} --pattern $p --out $CKPT/$p $resume > $CKPT/$p.log 2>&1" \
             "&& cp $CKPT/$p/training.json $RESULTS/training/$p.json"
    done | run_parallel
}

evaluate() {
    local fa="$RESULTS/full-attention" tp="$RESULTS/trained-pattern"
    {
        # Baselines: no fine-tuning, without and with the interpolation.
        echo "$PY -m scca_eval sweep --model default --pattern full ${EVAL[*]} --allow-long-context --out $fa/base --quiet"
        echo "$PY -m scca_eval sweep --model default --rope-scaling linear:2 --pattern full ${EVAL[*]} --out $fa/base-pi2 --quiet"
        for p in "${PATTERNS[@]}"; do
            # The adapter brings its RoPE scaling (training.json) and its training pattern.
            echo "$PY -m scca_eval sweep --model default --adapter $CKPT/$p --pattern full ${EVAL[*]} --out $fa/$p --quiet"
            [ "$p" = full ] || echo "$PY -m scca_eval sweep --model default --adapter $CKPT/$p --pattern $p ${EVAL[*]} --out $tp/$p --quiet"
        done
    } | run_parallel
}

passkey() {  # LongLoRA's passkey test on every checkpoint and the interpolated base, full attention
    local pk="$RESULTS/passkey"
    {
        echo "$PY -m scca_eval passkey --model default --rope-scaling linear:2 --pattern full ${PASSKEY[*]} --out $pk/base-pi2"
        for p in "${PATTERNS[@]}"; do
            echo "$PY -m scca_eval passkey --model default --adapter $CKPT/$p --pattern full ${PASSKEY[*]} --out $pk/$p"
        done
    } | run_parallel
}

report() {
    local fa="$RESULTS/full-attention" tp="$RESULTS/trained-pattern"
    $PY -m scca_eval table "$fa" --ci --reference scca_paper_pg19 --output "$RESULTS/full-attention.md"
    $PY -m scca_eval table "$fa" --ci --format csv --output "$RESULTS/full-attention.csv"
    $PY -m scca_eval table "$tp" "$fa/full" --ci --output "$RESULTS/trained-pattern.md"
    $PY "$HERE/ppl_vs_ctx.py" "$fa" --out "$RESULTS/full-attention"
    # Every row against the checkpoint trained with s2 (the paper's baseline): paired bootstrap.
    mkdir -p "$RESULTS/compare"
    for row in base base-pi2 "${PATTERNS[@]}"; do
        [ "$row" = s2 ] && continue
        $PY -m scca_eval compare "$fa/s2" "$fa/$row" --output "$RESULTS/compare/$row-vs-s2.md" > /dev/null
    done
    $PY "$HERE/loss_curves.py" "$RESULTS/training" --out "$RESULTS/loss"
    if [ -d "$RESULTS/passkey" ]; then
        $PY -m scca_eval table "$RESULTS/passkey" --output "$RESULTS/passkey.md"
    fi
}

stages=("$@"); [ ${#stages[@]} -gt 0 ] || stages=(finetune evaluate passkey report)
for stage in "${stages[@]}"; do
    case "$stage" in
        finetune|evaluate|passkey|report) "$stage" ;;
        *) echo "reproduce.sh: unknown stage '$stage'; give finetune, evaluate, passkey or report" >&2; exit 2 ;;
    esac
done
