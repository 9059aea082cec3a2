#!/usr/bin/env bash
# v2 of the small-scale comparison (see README.md beside this file; v1, the recipe as
# published, is results/finetune-smollm2-16k): SmolLM2-135M extended 2x with linear
# position interpolation (8k -> 16k) and LoRA fine-tuned under each attention pattern, with
# the learning rate chosen on validation loss, three seeds, a validation curve on every
# run, and a compute-matched table.
#
#   results/finetune-smollm2-16k-v2/reproduce.sh                  # all stages, in order
#   results/finetune-smollm2-16k-v2/reproduce.sh sweep finetune   # or some of: sweep finetune matched
#                                                                 #   evaluate passkey report
#   PARALLEL=6 results/finetune-smollm2-16k-v2/reproduce.sh       # that many runs at once
#   COMPILE=1 ...                                                  # finetune --compile (GPU): compiled
#             decoder layers, faster steps, the same results up to rounding; the compute-matched
#             stage times the patterns' steps compiled too
#   CHECKPOINTING=0 ...                                            # finetune --no-gradient-checkpointing
#             --offload-activations off --no-cuda-graphs (a GPU with room for every activation):
#             faster steps, the same results up to rounding; the compute-matched stage times the
#             steps that way too (unset: --gradient-checkpointing)
#
# Stages:
#   sweep     short runs of SWEEP_PATTERNS at every rate of LRS (seed 0); lr_sweep.py picks, per
#             pattern, the rate with the lowest final validation loss -> lr-sweep.{json,md,png}
#   finetune  main table: every pattern at the rate chosen for s2, seeds SEEDS, STEPS steps;
#             second table: each swept pattern at its own chosen rate, seed 0 (a run of the
#             main table is reused when the rates agree); each run of these tables (and of
#             matched) is evaluated and passkey-tested as soon as it has finished
#   matched   every sparse pattern at the s2 rate for the GPU time of STEPS full-attention steps:
#             seconds per step timed alone by `bench train` (matched-speed.json), steps scaled by it
#   evaluate  pg19_sample and proof_pile_sample at EVAL_CTX, full attention and the training
#             pattern, for the two baselines and every checkpoint (cells already written are skipped)
#   passkey   passkey retrieval at PASSKEY_CTX, full attention, for every checkpoint
#   report    tables (mean ± sd over seeds), paired tests against s2 per seed, curves
#
# Every stage resumes: a finished fine-tune (its training.json in CKPT, or the copy kept in
# RESULTS/training/ when it ran on another machine) is skipped, a stopped one continues from its
# checkpoint, an evaluation sweep skips the cells it wrote. Changing
# STEPS or the rates needs a fresh CKPT. The adapters go to $CKPT (default: checkpoints/
# here, not committed); RESULTS=DIR writes records, tables and plots there instead of here.
#
# A quick run that only checks that the stages chain (CPU, minutes; not a result):
#   RESULTS=/tmp/v2-smoke TRAIN_TASK=pg19_train VALID_TASK=proof_pile_train PATTERNS="full s2" \
#   SWEEP_PATTERNS="full s2" LRS="2e-5 2e-4" SEEDS="0 1" MATCHED_SEEDS=0 CTX=256 STEPS=4 SWEEP_STEPS=2 \
#   WARMUP=1 EVAL_TOKENS=512 EVAL_CTX=256,512 MAX_TOKENS=1024 PASSKEY_CTX=256,512 PASSKEY_TRIALS=1 \
#   PASSKEY_DEPTHS=2 DEVICE=cpu results/finetune-smollm2-16k-v2/reproduce.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
HERE=results/finetune-smollm2-16k-v2
RESULTS=${RESULTS:-$HERE}          # where records, tables and plots go
CKPT=${CKPT:-$RESULTS/checkpoints}
PY=${PYTHON:-python}
PARALLEL=${PARALLEL:-1}
read -r -a PATTERNS <<< "${PATTERNS:-full s2 scca_fixed scca_flow sda longmixed}"
read -r -a SWEEP_PATTERNS <<< "${SWEEP_PATTERNS:-full s2 longmixed}"
# A log grid from 2e-5 in steps of about 3.7x; 3.7e-3 was added when 1e-3 came out best at the edge.
read -r -a LRS <<< "${LRS:-2e-5 7e-5 2.7e-4 1e-3 3.7e-3}"
read -r -a SEEDS <<< "${SEEDS:-0 1 2}"
read -r -a MATCHED_SEEDS <<< "${MATCHED_SEEDS:-0}"

# Data: trained on TRAIN_TASK, validated on VALID_TASK (held out from both the training
# data and the evaluation samples); evaluated on the bundled held-out samples.
TRAIN_TASK=${TRAIN_TASK:-mixture_train}
VALID_TASK=${VALID_TASK:-mixture_validation}

# The recipe: LongLoRA's (rank 8, alpha 16, LoRA on q/k/v/o plus trainable embeddings and
# norms, AdamW, WARMUP warm-up steps then a constant rate), one CTX-token window per step.
CTX=${CTX:-16384}
STEPS=${STEPS:-1000}
SWEEP_STEPS=${SWEEP_STEPS:-$((STEPS / 5))}
WARMUP=${WARMUP:-20}
# The cap of a compute-matched run: 2 x STEPS windows of 16k (32.8M tokens) stay inside the
# 39.6M training tokens of mixture_train, so no run repeats its data.
MATCHED_MAX_STEPS=${MATCHED_MAX_STEPS:-$((STEPS * 2))}
MATCHED_SHAPE=${MATCHED_SHAPE:-smollm2-135m}   # the model shape the matched stage times (bench train --shape)
# Validation: EVAL_TOKENS // CTX windows (8 at 16k) every EVAL_EVERY steps; a tenth of a run
# must hold a point for the convergence rule (docs/finetune.md).
EVAL_TOKENS=${EVAL_TOKENS:-131072}
EVAL_EVERY=${EVAL_EVERY:-$(( STEPS / 20 > 0 ? STEPS / 20 : 1 ))}
SWEEP_EVAL_EVERY=${SWEEP_EVAL_EVERY:-$(( SWEEP_STEPS / 10 > 0 ? SWEEP_STEPS / 10 : 1 ))}
DEVICE_OPTION=(); [ -n "${DEVICE:-}" ] && DEVICE_OPTION=(--device "$DEVICE")
COMPILE_OPTION=(); [ "${COMPILE:-0}" = 1 ] && COMPILE_OPTION=(--compile)
CHECKPOINTING=${CHECKPOINTING:-1}
case $CHECKPOINTING in 0|1) ;; *) echo "reproduce.sh: CHECKPOINTING must be 0 or 1 (got '$CHECKPOINTING')" >&2; exit 2 ;; esac
# Without checkpointing every activation stays on the GPU (no first pass measured offloaded, as
# --offload-activations auto would run): the same step in the timing and in the runs. The step
# is always named (finetune's auto could choose differently for runs sharing a GPU), and without
# CUDA graphs, as the committed runs trained.
CHECKPOINT_OPTION=(--gradient-checkpointing)
[ "$CHECKPOINTING" = 0 ] && CHECKPOINT_OPTION=(--no-gradient-checkpointing --offload-activations off --no-cuda-graphs)
FINETUNE=(--model default --ctx "$CTX" --rope-scaling linear:2 --grad-accum 1 --warmup-steps "$WARMUP"
          --save-every 50 --task "$TRAIN_TASK" --eval-task "$VALID_TASK" --eval-tokens "$EVAL_TOKENS"
          "${DEVICE_OPTION[@]}" "${COMPILE_OPTION[@]}" "${CHECKPOINT_OPTION[@]}" --quiet)
# Evaluation as in v1: the paper's lengths scaled 2x, the first 24,577 tokens of each document.
EVAL_CTX=${EVAL_CTX:-2048,4096,8192,16384}
EVAL=(--ctx "$EVAL_CTX" --task pg19_sample --task proof_pile_sample --max-tokens "${MAX_TOKENS:-147456}"
      "${DEVICE_OPTION[@]}")
PASSKEY=(--ctx "${PASSKEY_CTX:-4096,8192,16384}" --trials "${PASSKEY_TRIALS:-10}" --depths "${PASSKEY_DEPTHS:-5}"
         --seed 0 "${DEVICE_OPTION[@]}" --quiet)
RUN_GROUPS=(main own matched)   # the fine-tunes that are evaluated (sweep runs are not)

run_parallel() {  # run the given commands (one per line on stdin), PARALLEL at a time
    local pids=() failed=0
    while IFS= read -r line; do
        bash -c "$line" & pids+=($!)
        if [ "${#pids[@]}" -ge "$PARALLEL" ]; then wait "${pids[0]}" || failed=1; pids=("${pids[@]:1}"); fi
    done
    for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
    return $failed
}

finetune_line() {  # GROUP NAME PATTERN FINETUNE-OPTIONS...: the command of one run (none when it has finished)
    local group=$1 name=$2 pattern=$3; shift 3
    local out="$CKPT/$group/$name" copy="$RESULTS/training/$group/$name.json" resume="" after=""
    mkdir -p "$CKPT/$group" "$RESULTS/training/$group"
    if [ -f "$out/training.json" ]; then
        [ -f "$copy" ] || cp "$out/training.json" "$copy"
        return
    fi
    # Finished on another machine: its training.json (and its evaluation records) are kept here,
    # its checkpoint is not. Delete the copy to train the run again.
    [ -f "$copy" ] && return
    [ -f "$out/checkpoint.pt" ] && resume="--resume"
    # A run of the tables is evaluated as soon as it has finished, on the machine that holds its
    # checkpoint: a machine given back before the other runs end keeps the numbers of those that finished.
    in_list "$group" "${RUN_GROUPS[@]}" && after=" && $(evaluation_line "$group/$name" "$pattern") && $(passkey_line "$group/$name")"
    echo "$PY -m scca_eval finetune ${FINETUNE[*]} --pattern $pattern $* --out $out $resume > $out.log 2>&1 && cp $out/training.json $copy$after"
}

evaluation_line() {  # GROUP/NAME PATTERN: evaluate a checkpoint with full attention and under its training pattern
    local line="$PY -m scca_eval sweep --model default --adapter $CKPT/$1 --pattern full ${EVAL[*]} --out $RESULTS/full-attention/$1 --quiet"
    # The adapter brings its RoPE scaling (training.json) and its training pattern.
    [ "$2" = full ] || line+=" && $PY -m scca_eval sweep --model default --adapter $CKPT/$1 --pattern $2 ${EVAL[*]} --out $RESULTS/trained-pattern/$1 --quiet"
    echo "$line"
}

passkey_line() {  # GROUP/NAME: passkey retrieval of a checkpoint, full attention
    echo "$PY -m scca_eval passkey --model default --adapter $CKPT/$1 --pattern full ${PASSKEY[*]} --out $RESULTS/passkey/$1"
}

json_field() {  # FILE KEY[.KEY...]: one value of a JSON file
    $PY -c 'import json, sys
value = json.load(open(sys.argv[1]))
for key in sys.argv[2].split("."):
    value = value[key]
print(value)' "$1" "$2"
}

chosen_lr() {  # PATTERN: the rate the sweep chose for it
    local choice="$RESULTS/lr-sweep.json"
    if [ ! -f "$choice" ]; then
        echo "reproduce.sh: $choice is missing; run the sweep stage first" >&2; exit 2
    fi
    $PY -c 'import json, sys
best = json.load(open(sys.argv[1]))["best"]
if sys.argv[2] not in best:
    sys.exit(f"reproduce.sh: the sweep chose no rate for {sys.argv[2]}: add it to SWEEP_PATTERNS and run the sweep stage")
print(best[sys.argv[2]])' "$choice" "$1"
}

in_list() {  # WORD LIST...: is WORD one of LIST?
    local word=$1; shift
    [[ " $* " == *" $word "* ]]
}

sweep() {
    for p in "${SWEEP_PATTERNS[@]}"; do
        for lr in "${LRS[@]}"; do
            finetune_line sweep "$p-lr$lr" "$p" --lr "$lr" --seed 0 --steps "$SWEEP_STEPS" \
                --eval-every "$SWEEP_EVAL_EVERY"
        done
    done | run_parallel
    $PY "$HERE/lr_sweep.py" "$RESULTS/training/sweep" --out "$RESULTS/lr-sweep"
}

finetune() {
    local main_lr own_lr
    main_lr=$(chosen_lr s2)
    for p in "${SWEEP_PATTERNS[@]}"; do chosen_lr "$p" > /dev/null; done  # fail here, not inside the pipe
    {
        for p in "${PATTERNS[@]}"; do
            for seed in "${SEEDS[@]}"; do
                finetune_line main "$p-seed$seed" "$p" --lr "$main_lr" --seed "$seed" --steps "$STEPS" \
                    --eval-every "$EVAL_EVERY"
            done
        done
        for p in "${SWEEP_PATTERNS[@]}"; do
            own_lr=$(chosen_lr "$p")
            # At s2's rate the second table's row is the main table's seed-0 run (the report reads
            # that one), whether or not this call's PATTERNS and SEEDS select it.
            [ "$own_lr" = "$main_lr" ] && continue
            finetune_line own "$p" "$p" --lr "$own_lr" --seed 0 --steps "$STEPS" --eval-every "$EVAL_EVERY"
        done
    } | run_parallel
}

matched() {  # every sparse pattern for the GPU time of STEPS full-attention steps, each alone on the GPU
    local main_lr speed="$RESULTS/matched-speed.json" seed p steps
    main_lr=$(chosen_lr s2)
    # Seconds per step of each pattern, timed one after another in one process on an idle GPU
    # (`bench train`: the experiment's model shape, ctx and settings, random weights): a
    # pattern's budget is STEPS x (full's s/step / its s/step) steps, capped at MATCHED_MAX_STEPS.
    # Kept in RESULTS, so the step counts are remade from it, not from another measurement.
    if [ ! -f "$speed" ]; then
        local measured=(full); for p in "${PATTERNS[@]}"; do [ "$p" = full ] || measured+=("$p"); done
        $PY -m scca_eval bench train --shape "$MATCHED_SHAPE" --ctx "$CTX" --pattern "$(IFS=,; echo "${measured[*]}")" \
            --no-baseline --warmup 2 --steps 5 "${DEVICE_OPTION[@]}" "${COMPILE_OPTION[@]}" "${CHECKPOINT_OPTION[@]}" --json "$speed.tmp" \
            --markdown "$RESULTS/matched-speed.md" > /dev/null
        mv "$speed.tmp" "$speed"
    fi
    for seed in "${MATCHED_SEEDS[@]}"; do
        for p in "${PATTERNS[@]}"; do
            [ "$p" = full ] && continue
            steps=$(matched_steps "$speed" "$p")
            finetune_line matched "$p-matched-seed$seed" "$p" --lr "$main_lr" --seed "$seed" \
                --steps "$steps" --eval-every "$EVAL_EVERY"
        done
    done | run_parallel
}

matched_steps() {  # SPEED-JSON PATTERN: STEPS scaled by full's seconds per step over the pattern's
    $PY -c 'import json, sys
speed = json.load(open(sys.argv[1]))
if speed.get("gradient_checkpointing", True) != (sys.argv[5] == "1"):
    timed = "with" if speed.get("gradient_checkpointing", True) else "without"
    sys.exit(f"reproduce.sh: {sys.argv[1]} timed the steps {timed} gradient checkpointing, and CHECKPOINTING={sys.argv[5]} "
             "trains the other way; delete it to time them again, or set CHECKPOINTING to match it")
rows = {row["pattern"]: row for row in speed["rows"] if row["path"] == "finetune"}
for name in ("full", sys.argv[2]):
    if name not in rows or rows[name].get("error") or not rows[name].get("seconds"):
        sys.exit(f"reproduce.sh: {sys.argv[1]} has no step time for {name}; delete it to measure again")
steps = round(int(sys.argv[3]) * rows["full"]["seconds"] / rows[sys.argv[2]]["seconds"])
print(min(steps, int(sys.argv[4])))' "$1" "$2" "$STEPS" "$MATCHED_MAX_STEPS" "$CHECKPOINTING"
}

checkpoints() {  # GROUP/NAME of every finished fine-tune of the tables
    local group run
    for group in "${RUN_GROUPS[@]}"; do
        for run in "$CKPT/$group"/*/; do
            if [ -f "$run/training.json" ]; then echo "$group/$(basename "$run")"; fi
        done
    done
}

evaluate() {
    local fa="$RESULTS/full-attention" run
    {
        # Baselines: no fine-tuning, without and with the interpolation.
        echo "$PY -m scca_eval sweep --model default --pattern full ${EVAL[*]} --allow-long-context --out $fa/base --quiet"
        echo "$PY -m scca_eval sweep --model default --rope-scaling linear:2 --pattern full ${EVAL[*]} --out $fa/base-pi2 --quiet"
        for run in $(checkpoints); do
            evaluation_line "$run" "$(json_field "$CKPT/$run/training.json" pattern_name)"
        done
    } | run_parallel
}

passkey() {  # LongLoRA's passkey test on every checkpoint and the interpolated base, full attention
    {
        echo "$PY -m scca_eval passkey --model default --rope-scaling linear:2 --pattern full ${PASSKEY[*]} --out $RESULTS/passkey/base-pi2"
        for run in $(checkpoints); do passkey_line "$run"; done
    } | run_parallel
}

own_rows() {  # the evaluation folders of the second table: each swept pattern at its own rate, seed 0
    local p
    for p in "${SWEEP_PATTERNS[@]}"; do
        if [ -d "$1/own/$p" ]; then echo "$1/own/$p"; elif [ -d "$1/main/$p-seed0" ]; then echo "$1/main/$p-seed0"; fi
    done
}

report() {
    local fa="$RESULTS/full-attention" tp="$RESULTS/trained-pattern" seed p
    $PY "$HERE/lr_sweep.py" "$RESULTS/training/sweep" --out "$RESULTS/lr-sweep"
    # Main table: mean ± sd over seeds, evaluated with full attention and under the training pattern.
    $PY "$HERE/seed_table.py" "$fa/main" --out "$RESULTS/main-full-attention"
    [ -d "$tp/main" ] && $PY "$HERE/seed_table.py" "$tp/main" --out "$RESULTS/main-trained-pattern"
    # Each checkpoint against the s2 checkpoint of the same seed: paired bootstrap per seed.
    mkdir -p "$RESULTS/compare"
    for seed in "${SEEDS[@]}"; do
        for p in "${PATTERNS[@]}"; do
            [ "$p" = s2 ] && continue
            [ -d "$fa/main/$p-seed$seed" ] && [ -d "$fa/main/s2-seed$seed" ] || continue
            $PY -m scca_eval compare "$fa/main/s2-seed$seed" "$fa/main/$p-seed$seed" \
                --output "$RESULTS/compare/$p-vs-s2-seed$seed.md" --json "$RESULTS/compare/$p-vs-s2-seed$seed.json" \
                > /dev/null
        done
    done
    # ... and over seeds: the mean change and how many seeds' tests agree.
    ls "$RESULTS"/compare/*-vs-s2-seed*.json > /dev/null 2>&1 && \
        $PY "$HERE/over_seeds.py" "$RESULTS/compare" --out "$RESULTS/compare-over-seeds"
    # Second table: each swept pattern at its own rate (seed 0); the baselines beside it.
    mapfile -t own < <(own_rows "$fa")
    [ "${#own[@]}" -gt 0 ] && $PY -m scca_eval table "${own[@]}" "$fa/base-pi2" --ci --output "$RESULTS/own-lr.md"
    # Compute-matched table: each sparse run of the GPU time of full attention's STEPS steps, beside it.
    for seed in "${MATCHED_SEEDS[@]}"; do
        [ -d "$fa/matched" ] && [ -d "$fa/main/full-seed$seed" ] || continue
        $PY -m scca_eval table "$fa/matched"/*-matched-seed"$seed" "$fa/main/full-seed$seed" --ci \
            --output "$RESULTS/matched-seed$seed.md"
        # ... and under each run's own pattern (full attention's own pattern is full attention).
        [ -d "$tp/matched" ] && \
            $PY -m scca_eval table "$tp/matched"/*-matched-seed"$seed" "$fa/main/full-seed$seed" --ci \
                --output "$RESULTS/matched-seed$seed-trained-pattern.md"
    done
    for group in sweep main own matched; do
        [ -d "$RESULTS/training/$group" ] && [ -n "$(ls -A "$RESULTS/training/$group")" ] && \
            $PY "$HERE/curves.py" "$RESULTS/training/$group" --out "$RESULTS/curves-$group"
    done
    if [ -d "$RESULTS/passkey" ]; then
        $PY -m scca_eval table "$RESULTS/passkey" --output "$RESULTS/passkey.md"
    fi
}

stages=("$@"); [ ${#stages[@]} -gt 0 ] || stages=(sweep finetune matched evaluate passkey report)
for stage in "${stages[@]}"; do
    case "$stage" in
        sweep|finetune|matched|evaluate|passkey|report) "$stage" ;;
        *) echo "reproduce.sh: unknown stage '$stage'; give sweep, finetune, matched, evaluate, passkey or report" >&2
           exit 2 ;;
    esac
done
