"""The named choices that the CLI, the API, the sweep files and the records share.

One list each, kept free of heavy imports so that ``--help`` and the report commands
start fast: the preset patterns (with the line ``scca-eval patterns list`` shows), the
compute dtypes, the attention backends a user may choose, and the protocols.
"""

from __future__ import annotations

# name -> one line on what it is, in the paper's order (docs/patterns.md)
PRESET_DESCRIPTIONS = {
    "full": "ordinary causal attention (every head sees every earlier token)",
    "s2": "LongLoRA S2-Attn: half the heads in chunks, half in chunks shifted by G/2",
    "scca_fixed": "SCCA fixed: half the heads see their chunk, half the previous chunk",
    "scca_flow": "SCCA flow: head group g sees the chunk g steps back; together every earlier chunk",
    "sda": "Shifted Dilated Attention: r head groups, group j sees distances j, j+r, ... (r = --dilation)",
    "longmixed": "LongMixed: 1/4 local, 1/4 cross(1), 1/8 each dilated(2,j), 1/16 each dilated(4,j)",
}
PRESETS = tuple(PRESET_DESCRIPTIONS)
SPARSE_PRESETS = tuple(name for name in PRESETS if name != "full")
# `bench attention` by default: every sparse preset, and sda once more with dilation 4
ATTENTION_BENCH_PATTERNS = tuple(label for name in SPARSE_PRESETS
                                 for label in ((name, "sda-r4") if name == "sda" else (name,)))

# dtype name (as --dtype and sweep files take it) -> the torch dtype's name
DTYPES = {
    "float32": "float32", "fp32": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16",
}

# The attention backends a user may choose (attention/dispatch.py has one more, "sdpa",
# which runs the full pattern only and is what "auto" picks for it).
ATTENTION_BACKENDS = ("auto", "packed", "strided", "chunked", "flex", "reference", "flash")

# stride: per document, every token scored once; longlora: LongLoRA's eval.py; lm-eval:
# lm-evaluation-harness's loglikelihood_rolling (docs/protocols.md)
PROTOCOLS = ("stride", "longlora", "lm-eval")
# how the stride protocol ends a document: a full ctx-long window, or only the tokens left
LAST_WINDOWS = ("full", "short")

# passkey retrieval's defaults: trials per depth bucket, depth buckets, prompt seed
PASSKEY_TRIALS, PASSKEY_DEPTHS, PASSKEY_SEED = 10, 5, 0
# sda's dilation r when --dilation is not given
DEFAULT_DILATION = 2
